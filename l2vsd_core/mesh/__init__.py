"""Meshes: differentiable rasterizer (torch | nvdiffrast), DMTet, geometry/texture refinement pieces."""
