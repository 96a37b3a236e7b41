"""The three stages of ProlificDreamer on one loop (:class:`~l2vsd_core.stages.base.Stage`): the NeRF (stage 1),
DMTet geometry refinement (stage 2) and texture refinement (stage 3)."""
from .base import Stage
from .geometry import GEOMETRY_FORMAT, GeometryStage
from .nerf import NERF_FORMAT, NerfStage, make_volume_renderer
from .texture import TEXTURE_FORMAT, TextureStage

__all__ = ["Stage", "NerfStage", "GeometryStage", "TextureStage", "make_volume_renderer", "NERF_FORMAT",
           "GEOMETRY_FORMAT", "TEXTURE_FORMAT"]
