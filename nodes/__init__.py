"""Node registry of the L2VSD pack.

The nodes are thin adapters over the headless library ``l2vsd_core``: they convert ComfyUI
inputs and outputs and report progress, while all the math lives in the library. This
package is the only place that imports ``comfy`` or ``folder_paths``, and it does so inside
the node methods, so the pack can still be imported where ComfyUI is absent (and without
importing torch: ComfyUI lists every pack's nodes at start-up).
"""
import sys
from pathlib import Path

# A pack cloned into custom_nodes/ is not pip-installed: make its bundled library importable. Appended, so an
# installed l2vsd_core (e.g. a development install) keeps precedence.
_PACK_ROOT = str(Path(__file__).resolve().parents[1])
if _PACK_ROOT not in sys.path:
    sys.path.append(_PACK_ROOT)

from .comfy_prior_node import PriorFromCheckpoint  # noqa: E402
from .export_node import ExportMesh  # noqa: E402
from .model_nodes import AttachLoRAScore, LoadPrior  # noqa: E402
from .optimize_node import L2VSDOptimize  # noqa: E402
from .refine_nodes import RefineGeometry, RefineTexture  # noqa: E402
from .scene_nodes import InitNeRF  # noqa: E402

# Type ids carry the pack's prefix: ComfyUI keeps one node per id across all packs (the last loaded wins), and
# generic ids such as ExportMesh are registered by other packs too. Saved workflows store the ids: renaming breaks them.
TYPE_ID_PREFIX = "L2VSD_"
NODE_CLASS_MAPPINGS = {
    "L2VSD_LoadPrior": LoadPrior,
    "L2VSD_PriorFromCheckpoint": PriorFromCheckpoint,
    "L2VSD_AttachLoRAScore": AttachLoRAScore,
    "L2VSD_InitNeRF": InitNeRF,
    "L2VSD_Optimize": L2VSDOptimize,
    "L2VSD_RefineGeometry": RefineGeometry,
    "L2VSD_RefineTexture": RefineTexture,
    "L2VSD_ExportMesh": ExportMesh,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "L2VSD_LoadPrior": "L2VSD Load Prior",
    "L2VSD_PriorFromCheckpoint": "L2VSD Prior from Model/CLIP/VAE",
    "L2VSD_AttachLoRAScore": "L2VSD Attach LoRA Score",
    "L2VSD_InitNeRF": "L2VSD Init NeRF",
    "L2VSD_Optimize": "L2VSD Optimize",
    "L2VSD_RefineGeometry": "L2VSD Refine Geometry",
    "L2VSD_RefineTexture": "L2VSD Refine Texture",
    "L2VSD_ExportMesh": "L2VSD Export Mesh",
}
