"""Scale to zero on one machine: an activator, revisions with traffic splits, and an autoscaler.

See `shared.platform.platform` for the API (`Platform`, `PlatformOptions`).
"""

from shared.platform.platform import Platform, PlatformOptions, default_state_file
from shared.platform.revision import ScalingOptions

__all__ = ["Platform", "PlatformOptions", "ScalingOptions", "default_state_file"]
