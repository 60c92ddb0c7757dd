"""Real diffusers pipelines, built from tiny configurations with random weights (no
downloads), with our scheduler swapped in by ``from_config(pipe.scheduler.config)``.

Text embeddings are passed directly (no tokenizer or text encoder). Where diffusers has a
scheduler running the same algorithm, the pipeline's images agree with it; otherwise they
are finite and of the right shape."""

from __future__ import annotations

from typing import Any

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers.utils import logging as diffusers_logging  # noqa: E402

from dpmsolver.frontends.diffusers_scheduler import DPMSolverScheduler  # noqa: E402

diffusers_logging.set_verbosity_error()
# diffusers' own deprecation notices (numpy 2's __array__ copy keyword, its deprecated
# algorithm_type="dpmsolver") are not about this code.
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:diffusers"),
    pytest.mark.filterwarnings("ignore::FutureWarning:diffusers"),
]

SIZE = 16  # pixels; the one-level VAE keeps latents at 16x16


def tiny_vae(**kw: Any) -> Any:
    return diffusers.AutoencoderKL(
        block_out_channels=(8,),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        sample_size=SIZE,
        **kw,
    )


@pytest.fixture(scope="module")
def sd_pipe() -> Any:
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16,
        norm_num_groups=4,
        attention_head_dim=4,
    )
    # Stable Diffusion v1's scheduler config.
    scheduler = diffusers.PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    pipe = diffusers.StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeddings(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "prompt_embeds": torch.randn(1, 7, 16, generator=g),
        "negative_prompt_embeds": torch.randn(1, 7, 16, generator=g),
    }


def text_to_image(pipe: Any, steps: int = 4) -> torch.Tensor:
    latents = torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    out = pipe(
        **embeddings(),
        guidance_scale=5.0,
        num_inference_steps=steps,
        height=SIZE,
        width=SIZE,
        latents=latents,
        output_type="pt",
    )
    return out.images


@pytest.mark.parametrize(
    ("solver", "peer"),
    [
        ("dpmpp_2m", "DPMSolverMultistepScheduler"),
        ("dpmpp_2s", "DPMSolverSinglestepScheduler"),
        ("dpmpp_3m", None),
        ("dpm_fast", None),
    ],
)
def test_text_to_image_with_guidance(sd_pipe: Any, solver: str, peer: str | None) -> None:
    config = sd_pipe.scheduler.config
    sd_pipe.scheduler = DPMSolverScheduler.from_config(config, solver=solver)
    image = text_to_image(sd_pipe)
    assert image.shape == (1, 3, SIZE, SIZE) and torch.isfinite(image).all()
    if peer is not None:
        sd_pipe.scheduler = getattr(diffusers, peer).from_config(config)
        reference = text_to_image(sd_pipe)
        assert (image - reference).abs().max() < 1e-4
    sd_pipe.scheduler = DPMSolverScheduler.from_config(config)  # leave a fresh one


def test_image_to_image_starts_midway(sd_pipe: Any) -> None:
    config = sd_pipe.scheduler.config
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**sd_pipe.components)
    img2img.set_progress_bar_config(disable=True)
    init = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    images = []
    for scheduler in (
        DPMSolverScheduler.from_config(config, solver="dpmpp_2m"),
        diffusers.DPMSolverMultistepScheduler.from_config(config),
    ):
        img2img.scheduler = scheduler
        out = img2img(
            **embeddings(),
            image=init,
            strength=0.6,
            num_inference_steps=5,
            guidance_scale=4.0,
            generator=torch.Generator().manual_seed(4),
            output_type="pt",
        )
        images.append(out.images)
    assert images[0].shape == (1, 3, SIZE, SIZE) and torch.isfinite(images[0]).all()
    assert (images[0] - images[1]).abs().max() < 1e-4


def test_image_to_image_with_a_singlestep_solver(sd_pipe: Any) -> None:
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**sd_pipe.components)
    img2img.set_progress_bar_config(disable=True)
    img2img.scheduler = DPMSolverScheduler.from_config(sd_pipe.scheduler.config, solver="dpmpp_3s")
    init = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    out = img2img(
        **embeddings(), image=init, strength=0.5, num_inference_steps=8, output_type="pt"
    ).images
    assert img2img.scheduler.begin_index == 4 and img2img.scheduler.step_index == 8
    assert out.shape == (1, 3, SIZE, SIZE) and torch.isfinite(out).all()


@pytest.fixture(scope="module")
def sd3_parts() -> dict[str, Any]:
    torch.manual_seed(0)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=SIZE,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=16,
        pooled_projection_dim=8,
    )
    vae = tiny_vae(shift_factor=0.06, scaling_factor=1.5)
    return {"transformer": transformer, "vae": vae}


def sd3(parts: dict[str, Any], scheduler: Any) -> Any:
    pipe = diffusers.StableDiffusion3Pipeline(
        scheduler=scheduler,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
        **parts,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flow_image(pipe: Any, steps: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    embeds = {
        "prompt_embeds": torch.randn(1, 5, 16, generator=g),
        "negative_prompt_embeds": torch.randn(1, 5, 16, generator=g),
        "pooled_prompt_embeds": torch.randn(1, 8, generator=g),
        "negative_pooled_prompt_embeds": torch.randn(1, 8, generator=g),
    }
    latents = torch.randn(1, 4, SIZE, SIZE, generator=g)
    out = pipe(
        **embeds,
        num_inference_steps=steps,
        height=SIZE,
        width=SIZE,
        guidance_scale=3.0,
        latents=latents,
        output_type="pt",
    )
    return out.images


@pytest.mark.parametrize(
    "config", [{"shift": 3.0}, {"use_dynamic_shifting": True, "base_image_seq_len": 64}]
)
def test_flow_matching_pipeline(sd3_parts: dict[str, Any], config: dict[str, Any]) -> None:
    """SD3 with its FlowMatchEuler config: our DDIM is exactly Euler on the flow ODE (so it
    reproduces FlowMatchEulerDiscreteScheduler), and DPM-Solver++(2M) runs; with dynamic
    shifting the pipeline passes mu."""
    reference = flow_image(sd3(sd3_parts, diffusers.FlowMatchEulerDiscreteScheduler(**config)))
    flow_config = diffusers.FlowMatchEulerDiscreteScheduler(**config).config
    euler = flow_image(sd3(sd3_parts, DPMSolverScheduler.from_config(flow_config, solver="ddim")))
    assert (euler - reference).abs().max() < 1e-4
    scheduler = DPMSolverScheduler.from_config(flow_config, solver="dpmpp_2m")
    image = flow_image(sd3(sd3_parts, scheduler))
    assert scheduler.config.prediction_type == "flow_prediction"
    assert image.shape == (1, 3, SIZE, SIZE) and torch.isfinite(image).all()
    assert (image - reference).abs().max() > 1e-4  # a different solver, not a no-op


def test_flux_pipeline_passes_sigmas_and_mu() -> None:
    """Flux passes its own sigmas and a resolution-dependent mu to set_timesteps."""
    torch.manual_seed(0)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4),
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 8),
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=32,
        shift_factor=0.06,
        scaling_factor=1.5,
    )
    euler = diffusers.FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256
    )
    pipe = diffusers.FluxPipeline(
        scheduler=euler,
        vae=vae,
        transformer=transformer,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
    )
    pipe.set_progress_bar_config(disable=True)

    def image() -> torch.Tensor:
        g = torch.Generator().manual_seed(1)
        return pipe(
            prompt_embeds=torch.randn(1, 5, 16, generator=g),
            pooled_prompt_embeds=torch.randn(1, 8, generator=g),
            num_inference_steps=4,
            height=32,
            width=32,
            guidance_scale=3.5,
            output_type="pt",
            generator=torch.Generator().manual_seed(2),
        ).images

    reference = image()
    pipe.scheduler = DPMSolverScheduler.from_config(euler.config, solver="ddim")
    assert (image() - reference).abs().max() < 1e-4
    pipe.scheduler = DPMSolverScheduler.from_config(euler.config, solver="dpmpp_2m")
    out = image()
    assert (
        out.shape == (1, 3, 32, 32)
        and torch.isfinite(out).all()
        and (out - reference).abs().max() > 1e-4
    )
