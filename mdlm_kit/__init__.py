"""mdlm-kit: masked (absorbing-state) discrete diffusion language models. Importing it is cheap and side-effect
free; the Lightning glue is in ``mdlm_kit.lightning``, the data pipeline in ``mdlm_kit.data``."""

from mdlm_kit.errors import UserError
from mdlm_kit.schedules import SCHEDULES, Schedule, make_schedule

__version__ = "0.1.0"
__all__ = ["SCHEDULES", "Schedule", "UserError", "make_schedule", "__version__"]
