"""Front ends: the solver core behind the interfaces people already call.

- :mod:`dpmsolver.frontends.diffusers_scheduler`: ``DPMSolverScheduler`` (and its inverse),
  a diffusers scheduler driven by our solvers (needs ``pip install diffusers``).
- :mod:`dpmsolver.frontends.kdiffusion`: k-diffusion / ComfyUI-style ``sample_*`` functions,
  sigma-grid helpers and discrete DDPM denoiser wrappers (no extra dependency).
- :mod:`dpmsolver.frontends.stepper`: drives any registered solver one network evaluation
  at a time, for pipelines that own the loop.
- :mod:`dpmsolver.frontends.diffusers_grid`: time grids built the way diffusers builds them.

Nothing here re-implements solver arithmetic: every update is a registered solver's ``step``.
"""
