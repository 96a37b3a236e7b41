"""ComfyUI entry point of the L2VSD node pack.

ComfyUI imports this file as a package named after the pack's folder (any name, e.g.
``ComfyUI-L2VSD``) and reads the two mappings below. Nothing heavy happens here: torch and
the ``comfy`` modules are imported only by the nodes that need them.
"""

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    # Imported as a plain module, outside any package (pytest imports the rootdir's
    # __init__.py this way): there is no package to import nodes from, so export none.
    NODE_CLASS_MAPPINGS = {}
    NODE_DISPLAY_NAME_MAPPINGS = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
