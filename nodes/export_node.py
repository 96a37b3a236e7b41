"""ExportMesh: a stage-1 scene (iso-surface → decimation) or a refined mesh (decimation) → UV atlas and baked texture
→ GLB/OBJ/PLY in ComfyUI's output folder, plus a turntable: the node's inputs as an ``ExportConfig`` and one call of
``l2vsd_core.pipeline.export_nerf`` / ``export_refined`` and ``write_turntable``. The returned path is relative to the
output folder: what ComfyUI's core Preview3D node takes. GLB and OBJ files, and the core ``MESH`` output (which SaveGLB
writes as it is), are y up with the object's front facing +z, glTF's convention (``l2vsd_core.export.WORLD_TO_Y_UP``
turns the z-up world); PLY files keep the world's z up."""
from __future__ import annotations

import math
from pathlib import Path

from .common import (CATEGORY_EXPORT, MESH_TYPE, SCENE_TYPE, display_animation, input_error, make_config,
                     output_directory, relative_subpath)
from .scene_nodes import RefinedMesh, Scene

FORMATS = ("glb", "obj", "ply")
TURNTABLE_VIEW = (15.0, 1.5, 70.0)  # elevation°, distance, fovy°: the optimizer's preview camera
EXPORT_FIELDS = {name: name for name in ("mesh_resolution", "threshold", "max_faces", "texture_size",
                                          "turntable_views", "turntable_resolution")}


def parse_threshold(text: str):
    """'auto' or a finite density level."""
    text = str(text).strip().lower()
    if text == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise input_error("threshold", f"{text!r} is neither 'auto' nor a number",
                          "write 'auto' (the level whose mesh silhouettes match the volume renders) or a density such as 10")
    return value


def _source(scene, mesh):
    """The one connected input: a stage-1 Scene or a RefinedMesh (ComfyUI allows one type per socket, hence two
    optional sockets)."""
    if scene is None and mesh is None:
        raise input_error("scene", "neither scene nor mesh is connected",
                          "connect one of them: a scene from L2VSD Optimize, or a mesh from L2VSD Refine Geometry "
                          "or L2VSD Refine Texture")
    if scene is not None and mesh is not None:
        raise input_error("mesh", "both scene and mesh are connected",
                          "connect only one of them: the mesh of a refine node, or a stage-1 scene")
    if scene is not None and not isinstance(scene, Scene):
        raise input_error("scene", f"got {type(scene).__name__}", "connect the output of an L2VSD Optimize node")
    if mesh is not None and not isinstance(mesh, RefinedMesh):
        raise input_error("mesh", f"got {type(mesh).__name__}",
                          "connect the output of an L2VSD Refine Geometry or Refine Texture node")
    return scene if scene is not None else mesh


class ExportMesh:
    """Turn an optimized scene or a refined mesh into a textured mesh file and a turntable."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "mesh_resolution": ("INT", {"default": 128, "min": 8, "max": 1024,
                                        "tooltip": "Marching-cubes grid size (scene only; toy demo: 64)."}),
            "threshold": ("STRING", {"default": "auto",
                                     "tooltip": "Density level of the surface (scene only): 'auto' (the level whose "
                                                "mesh silhouettes match the volume renders) or a number."}),
            "max_faces": ("INT", {"default": 200000, "min": 4, "max": 10000000,
                                  "tooltip": "Decimate the surface to at most this many faces before UV "
                                             "unwrapping."}),
            "texture_size": ("INT", {"default": 1024, "min": 8, "max": 8192,
                                     "tooltip": "Width = height of the baked texture in pixels."}),
            "format": (list(FORMATS), {"default": "glb",
                                       "tooltip": "glb (one file, textured; Preview3D shows it), obj (+ .mtl and "
                                                  ".png) or ply (vertex colours). glb and obj are y up (glTF's "
                                                  "convention), ply z up."}),
            "filename_prefix": ("STRING", {"default": "3d/l2vsd",
                                           "tooltip": "File name under ComfyUI's output folder; a counter is "
                                                      "appended. Subfolders allowed, '..' and absolute paths not."}),
            "turntable_views": ("INT", {"default": 30, "min": 1, "max": 360,
                                        "tooltip": "Frames of the turntable (IMAGE output and GIF next to the "
                                                   "mesh; toy demo: 24)."}),
            "turntable_resolution": ("INT", {"default": 128, "min": 8, "max": 1024,
                                             "tooltip": "Width = height of the turntable frames (toy demo: 64)."}),
        }, "optional": {
            "scene": (SCENE_TYPE, {"tooltip": "A stage-1 scene from L2VSD Optimize: its iso-surface is exported. "
                                              "Connect this or mesh, not both."}),
            "mesh": (MESH_TYPE, {"tooltip": "A refined mesh from L2VSD Refine Geometry (stage-1 colours) or L2VSD "
                                            "Refine Texture (its texture). Connect this or scene, not both."}),
        }}

    RETURN_TYPES = ("STRING", "IMAGE", "MESH")
    RETURN_NAMES = ("model_file", "turntable", "mesh")
    OUTPUT_TOOLTIPS = (
        "The mesh file's path relative to ComfyUI's output folder (e.g. 3d/l2vsd_00001_.glb): wire it into core "
        "Preview3D to view it.",
        "The turntable frames (turntable_views images at turntable_resolution; also saved as a GIF next to the "
        "mesh); the node itself plays the turntable, enlarged.",
        "The exported geometry as core MESH (no texture; y up, front +z), for core SaveGLB.",
    )
    OUTPUT_NODE = True  # writes files: worth running even when nothing is connected to its outputs
    FUNCTION = "export"
    CATEGORY = CATEGORY_EXPORT
    DESCRIPTION = ("Saves a textured mesh of a stage-1 scene or of a refined mesh under the output folder; wire "
                   "model_file into Preview3D (newer ComfyUI) to view it, or mesh (geometry only) into SaveGLB.")

    def export(self, mesh_resolution, threshold, max_faces, texture_size, format, filename_prefix,
               turntable_views, turntable_resolution, scene=None, mesh=None):
        source = _source(scene, mesh)
        if format not in FORMATS:
            raise input_error("format", f"{format!r} is not an option", f"pick one of {', '.join(FORMATS)}")
        export = export_config(mesh_resolution=mesh_resolution, threshold=threshold, max_faces=max_faces,
                               texture_size=texture_size, turntable_views=turntable_views,
                               turntable_resolution=turntable_resolution)
        prefix = relative_subpath("filename_prefix", filename_prefix, "prefix")
        mesh_path, turntable_path = _counter_paths(prefix, format)

        import torch
        from l2vsd_core import pipeline

        from .runs import log

        with torch.inference_mode(False), torch.no_grad():
            if isinstance(source, Scene):
                try:
                    saved = pipeline.export_nerf(source.field, export, mesh_path, format=format, log=log)
                except ValueError as e:
                    if "no surface" not in str(e):
                        raise
                    raise input_error("threshold", str(e), "use 'auto' or a lower density, or optimize longer") from e
                pipeline.write_turntable(turntable_path, export, source.field, source.background,
                                         renderer=source.make_renderer(), view=TURNTABLE_VIEW)
            else:
                saved = pipeline.export_refined(source.mesh, source.color, export, mesh_path, log=log)
                pipeline.write_turntable(turntable_path, export, source.color, source.background, mesh=source.mesh,
                                         view=TURNTABLE_VIEW)

        relative = mesh_path.relative_to(output_directory()).as_posix()
        log(f"mesh: {len(saved.vertices)} vertices, {len(saved.faces)} faces → {mesh_path}")
        ui = {"l2vsd_mesh": [{"filename": mesh_path.name, "subfolder": str(Path(relative).parent.as_posix()),
                              "type": "output", "vertices": len(saved.vertices), "faces": len(saved.faces)}],
              **display_animation(turntable_path, "l2vsd_turntable")}
        return {"ui": ui, "result": (relative, _gif_frames(turntable_path), CoreMesh.of(saved))}


def export_config(*, mesh_resolution, threshold, max_faces, texture_size, turntable_views, turntable_resolution):
    """ExportMesh's settings as the core's ``ExportConfig``; a value it refuses is an input error naming the input."""
    from l2vsd_core.config import ExportConfig

    return make_config(ExportConfig, EXPORT_FIELDS, "change it (see its tooltip)",
                       mesh_resolution=int(mesh_resolution), threshold=parse_threshold(threshold),
                       max_faces=int(max_faces), texture_size=int(texture_size), turntable_views=int(turntable_views),
                       turntable_resolution=int(turntable_resolution))


class CoreMesh:
    """ComfyUI's ``MESH`` socket value (newer hosts' ``SaveGLB`` reads ``.vertices`` [B, N, 3] and ``.faces``
    [B, M, 3]): the exported geometry, without the texture — the textured file is ``model_file``.  In the GLB file's
    axes (y up, front +z), since SaveGLB writes the vertices into a glTF unchanged."""

    def __init__(self, vertices, faces):
        self.vertices, self.faces = vertices, faces

    @classmethod
    def of(cls, mesh) -> "CoreMesh":
        """The core mesh of a world-axes ``trimesh.Trimesh`` (what the pipeline's export returns), turned y up."""
        import torch
        from l2vsd_core.export import world_to_y_up
        return cls(torch.as_tensor(world_to_y_up(mesh.vertices), dtype=torch.float32)[None],
                   torch.as_tensor(mesh.faces, dtype=torch.int64)[None])


def _counter_paths(prefix: str, format: str):
    """Counter-numbered mesh and turntable paths under the output folder, like ComfyUI's image savers name files."""
    import folder_paths

    out_dir = str(output_directory())
    try:
        folder, name, counter, _subfolder, _prefix = folder_paths.get_save_image_path(prefix, out_dir)
    except Exception as e:  # the host's own check against leaving the output folder
        raise input_error("filename_prefix", str(e), "use a relative prefix such as '3d/l2vsd'") from e
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{name}_{counter:05}_"
    return folder / f"{stem}.{format}", folder / f"{stem}.gif"


def _gif_frames(path: Path):
    """The turntable GIF's frames as one IMAGE batch (Pillow merges identical consecutive frames)."""
    from PIL import Image, ImageSequence
    from .common import to_image_batch

    with Image.open(path) as gif:
        return to_image_batch([frame.convert("RGB") for frame in ImageSequence.Iterator(gif)])
