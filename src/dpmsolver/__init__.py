"""dpmsolver: fast, measured diffusion-model sampling (DPM-Solver++ and its family).

The pieces, one module each:

- :mod:`dpmsolver.schedules`         what noise level each time means
- :mod:`dpmsolver.parameterization`  what the network outputs (eps, x0, v, score, flow)
- :mod:`dpmsolver.denoiser`          the one contract ``x0_hat = D(x, knot)``
- :mod:`dpmsolver.guidance`          classifier-free / classifier guidance, thresholding
- :mod:`dpmsolver.timegrid`          where to step
- :mod:`dpmsolver.solvers`           the step functions, their shapes and their registry
- :mod:`dpmsolver.plan`              each step's order and cost (the one owner of those rules)
- :mod:`dpmsolver.loop`              the one sampling loop, ``solve``
- :mod:`dpmsolver.recipe`            a complete solver configuration; named policies
- :mod:`dpmsolver.sampling`          the plain front end: ``sample``, ``invert``
- :mod:`dpmsolver.auto`              ``solver="auto"``: the measured default policy
- :mod:`dpmsolver.tune`              ``tune``: the sampler fitted to one model (a ``Profile``)
- :mod:`dpmsolver.analytic`          exact Gaussian-mixture models and a reference ODE solver
- :mod:`dpmsolver.generate`          large sharded, resumable, multi-process generation
"""

from . import auto  # noqa: F401  (registers the "auto" policy)
from ._version import __version__
from .analytic import (
    GaussianMixture,
    MixtureDenoiser,
    MixtureNetwork,
    default_mixture,
    reference_solve,
)
from .denoiser import Denoiser, ModelDenoiser
from .frontends.diffusers_grid import (
    prediction_from_diffusers_config,
    schedule_from_diffusers_config,
)
from .guidance import ClassifierFreeGuidance, ClassifierGuidance, DynamicThresholding, X0Corrector
from .loop import NonFiniteError, SampleResult, StepInfo, solve
from .parameterization import PREDICTIONS, to_data, to_noise
from .plan import Plan, make_plan
from .recipe import Recipe, default_solver
from .sampling import SampleOptions, build_denoiser, invert, sample
from .schedules import (
    ContinuousVPSchedule,
    DiscreteVPSchedule,
    Knot,
    NoiseSchedule,
    RectifiedFlowSchedule,
    VESchedule,
    make_schedule,
)
from .solvers import REGISTRY, get_solver
from .timegrid import (
    GRID_KINDS,
    TimeGrid,
    default_grid,
    grid_from_sigmas,
    grid_from_timesteps,
    make_grid,
)
from .tune import Profile, tune

__all__ = [
    "GRID_KINDS",
    "PREDICTIONS",
    "REGISTRY",
    "ClassifierFreeGuidance",
    "ClassifierGuidance",
    "ContinuousVPSchedule",
    "Denoiser",
    "DiscreteVPSchedule",
    "DynamicThresholding",
    "GaussianMixture",
    "Knot",
    "MixtureDenoiser",
    "MixtureNetwork",
    "ModelDenoiser",
    "NoiseSchedule",
    "NonFiniteError",
    "Plan",
    "Profile",
    "Recipe",
    "RectifiedFlowSchedule",
    "SampleOptions",
    "SampleResult",
    "StepInfo",
    "TimeGrid",
    "VESchedule",
    "X0Corrector",
    "__version__",
    "build_denoiser",
    "default_grid",
    "default_mixture",
    "default_solver",
    "get_solver",
    "grid_from_sigmas",
    "grid_from_timesteps",
    "invert",
    "make_grid",
    "make_plan",
    "make_schedule",
    "prediction_from_diffusers_config",
    "reference_solve",
    "sample",
    "schedule_from_diffusers_config",
    "solve",
    "to_data",
    "to_noise",
    "tune",
]
