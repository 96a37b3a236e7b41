"""Node registry of the L2VSD pack.

The nodes are thin adapters over the headless library ``l2vsd_core``: they convert ComfyUI
inputs and outputs and report progress, while all the math lives in the library. This
package is the only place that imports ``comfy`` or ``folder_paths``, and it does so inside
the node modules, so the pack can still be imported where ComfyUI is absent.
"""

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
