"""DMTet: tetrahedral grid, marching tetrahedra, SDF init from a density, mesh regularizers.

References are independent of the code under test: exact integer volumes, face counting, analytic SDFs (sphere,
plane, linear field in one tet), the divergence theorem, finite differences (``gradcheck``), hand-computed
regularizer values on flat / folded / hinged sheets.
"""
import math

import pytest
import torch

from l2vsd_core.export import auto_threshold
from l2vsd_core.mesh.dmtet import (DMTet, TriangleMesh, face_areas, face_normals, marching_tets, mesh_volume,
                                   surface_bbox, vertex_normals)
from l2vsd_core.mesh.regularizers import (edge_face_pairs, graph_laplacian_norm, laplacian_smoothness, mesh_edges,
                                          normal_consistency, uniform_laplacian, vertex_normal_consistency)
from l2vsd_core.mesh.tetgrid import cube_tet_grid, scale_to_bbox, tet_volumes, unique_edges

pytestmark = pytest.mark.usefixtures("one_thread")

D = torch.float64
CENTER = torch.tensor([0.05, -0.03, 0.02], dtype=D)  # off the lattice, so no SDF value is exactly 0


# ----------------------------------------------------------------------------------------------- helpers
def integer_coords(grid):
    """Grid vertices as exact integers 0..N."""
    return torch.round((grid.vertices.double() + 1.0) * grid.resolution / 2).long()


def directed_edge_counts(faces):
    """{(a, b): count} over the directed edges of the faces."""
    counts = {}
    for a, b in faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2).tolist():
        counts[(a, b)] = counts.get((a, b), 0) + 1
    return counts


def sphere_mesh(resolution, radius=0.6, center=CENTER):
    model = DMTet(resolution).double()
    with torch.no_grad():
        model.sdf.copy_((model.grid_vertices - center).norm(dim=-1) - radius)
        return model, model()


def flat_grid(m, fold_deg=0.0):
    """m x m unit squares in the xy-plane, each cut along the same diagonal (every interior vertex has the 6
    neighbours (+-1, 0), (0, +-1), (1, 1), (-1, -1)).  ``fold_deg`` folds the half x > m/2 up by that angle about
    the line x = m/2.  Returns (vertices [(m+1)^2, 3] float64, faces, interior vertex mask)."""
    i, j = torch.meshgrid(torch.arange(m + 1), torch.arange(m + 1), indexing="ij")
    x, y = i.reshape(-1).double(), j.reshape(-1).double()
    z = torch.zeros_like(x)
    half = m / 2
    theta = math.radians(fold_deg)
    beyond = x > half
    x_f = torch.where(beyond, half + (x - half) * math.cos(theta), x)
    z = torch.where(beyond, (x - half) * math.sin(theta), z)
    vertices = torch.stack([x_f, y, z], -1)
    index = lambda a, b: a * (m + 1) + b  # noqa: E731
    faces = []
    for a in range(m):
        for b in range(m):
            faces += [[index(a, b), index(a + 1, b), index(a + 1, b + 1)],
                      [index(a, b), index(a + 1, b + 1), index(a, b + 1)]]
    interior = ((i > 0) & (i < m) & (j > 0) & (j < m)).reshape(-1)
    return vertices, torch.tensor(faces), interior


def random_rotation(seed):
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=D))
    return q * torch.sign(torch.linalg.det(q))


# ----------------------------------------------------------------------------------------------- tet grid
@pytest.mark.parametrize("n", [1, 2, 3])
def test_grid_vertex_count_unique_vertices_and_positive_unit_volumes(n):
    grid = cube_tet_grid(n)
    ijk = integer_coords(grid)
    assert grid.vertices.shape == ((n + 1) ** 3, 3) and grid.tets.shape == (6 * n ** 3, 4)
    assert torch.unique(ijk, dim=0).shape[0] == (n + 1) ** 3  # no duplicated vertex
    assert torch.allclose(grid.vertices.double(), ijk.double() * 2 / n - 1, atol=1e-7)
    # exact integer 6 x volume: every Kuhn tet is 1/6 of a unit cube, so det = +1 exactly, and they fill N^3 cubes
    corner = ijk[grid.tets]
    e1, e2, e3 = (corner[:, k] - corner[:, 0] for k in (1, 2, 3))
    det = (e1[:, 0] * (e2[:, 1] * e3[:, 2] - e2[:, 2] * e3[:, 1])
           - e1[:, 1] * (e2[:, 0] * e3[:, 2] - e2[:, 2] * e3[:, 0])
           + e1[:, 2] * (e2[:, 0] * e3[:, 1] - e2[:, 1] * e3[:, 0]))
    assert bool((det == 1).all()) and int(det.sum()) == 6 * n ** 3
    assert torch.isclose(tet_volumes(grid.vertices.double(), grid.tets).sum(), torch.tensor(8.0, dtype=D))


@pytest.mark.parametrize("n", [2, 3])
def test_grid_faces_are_conforming(n):
    grid = cube_tet_grid(n)
    ijk = integer_coords(grid)
    tets = grid.tets
    faces = torch.cat([tets[:, [1, 2, 3]], tets[:, [0, 2, 3]], tets[:, [0, 1, 3]], tets[:, [0, 1, 2]]])
    opposite = torch.cat([tets[:, 0], tets[:, 1], tets[:, 2], tets[:, 3]])
    keys, inverse, counts = torch.unique(faces.sort(1).values, dim=0, return_inverse=True, return_counts=True)
    assert int(counts.max()) == 2
    # boundary faces: on the cube surface (all three corners share a coordinate 0 or N); 2 triangles per square
    boundary = keys[counts == 1]
    on_side = [((ijk[boundary][:, :, axis] == value).all(1)) for axis in range(3) for value in (0, n)]
    assert bool(torch.stack(on_side).any(0).all())
    assert boundary.shape[0] == 6 * n * n * 2
    # interior faces: the two tets lie on opposite sides of the shared triangle (no overlap)
    for key in torch.nonzero(counts == 2)[:, 0].tolist():
        members = torch.nonzero(inverse == key)[:, 0]
        tri = ijk[keys[key]].double()
        normal = torch.linalg.cross(tri[1] - tri[0], tri[2] - tri[0], dim=-1)
        sides = [(ijk[opposite[m]].double() - tri[0]) @ normal for m in members]
        assert sides[0] * sides[1] < 0
    # the tet complex of a cube is a ball: V - E + F - T = 1
    assert grid.vertices.shape[0] - grid.edges.shape[0] + keys.shape[0] - tets.shape[0] == 1


@pytest.mark.parametrize("n", [1, 3])
def test_grid_edges_match_sort_based_reference(n):
    grid = cube_tet_grid(n)
    reference, reference_tet_edges = unique_edges(grid.tets)
    assert grid.edges.shape == reference.shape
    assert torch.equal(torch.unique(grid.edges, dim=0), reference)
    assert torch.equal(grid.edges[grid.tet_edges], reference[reference_tet_edges])
    assert bool((grid.edges[:, 0] < grid.edges[:, 1]).all())
    # local edge order (0,1), (0,2), (0,3), (1,2), (1,3), (2,3)
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    for k, (a, b) in enumerate(pairs):
        ends = grid.edges[grid.tet_edges[:, k]]
        pair = grid.tets[:, [a, b]]
        assert torch.equal(ends, torch.stack([pair.min(1).values, pair.max(1).values], -1))


def test_scale_to_bbox_maps_corners_and_keeps_orientation():
    grid = cube_tet_grid(2)
    box = torch.tensor([[-0.5, 0.0, -2.0], [1.5, 0.25, 2.0]], dtype=D)
    scaled = scale_to_bbox(grid.vertices.double(), box)
    assert torch.allclose(scaled.min(0).values, box[0]) and torch.allclose(scaled.max(0).values, box[1])
    volumes = tet_volumes(scaled, grid.tets)
    assert bool((volumes > 0).all()) and torch.isclose(volumes.sum(), (box[1] - box[0]).prod())


# ----------------------------------------------------------------------------------------------- marching tets
def test_sphere_mesh_is_closed_manifold_outward_and_on_the_sphere():
    n, radius = 12, 0.6
    _, (vertices, faces) = sphere_mesh(n, radius)
    counts = directed_edge_counts(faces)
    # closed, edge-manifold and consistently oriented: each directed edge once, and its reverse once
    assert all(c == 1 for c in counts.values())
    assert all((b, a) in counts for a, b in counts)
    num_edges = len(counts) // 2
    assert vertices.shape[0] - num_edges + faces.shape[0] == 2  # one sphere
    assert torch.unique(faces).numel() == vertices.shape[0]  # no unreferenced vertex
    assert bool((face_areas(vertices, faces) > 0).all())
    distance_error = ((vertices - CENTER).norm(dim=-1) - radius).abs().max()
    assert distance_error < 0.25 * (2 / n)  # well below a cell
    volume = mesh_volume(vertices, faces)
    assert volume > 0  # outward
    # outward also locally: the normals point away from the centre
    centroids = vertices[faces].mean(1)
    assert bool(((face_normals(vertices, faces) * (centroids - CENTER)).sum(-1) > 0).all())
    assert bool(((vertex_normals(vertices, faces) * (vertices - CENTER)).sum(-1) > 0.9 * radius).all())


def test_sphere_volume_error_shrinks_with_resolution():
    radius = 0.6
    exact = 4 / 3 * math.pi * radius ** 3
    errors = {}
    for n in (8, 16):
        _, mesh = sphere_mesh(n, radius)
        errors[n] = abs(float(mesh.volume()) - exact) / exact
        assert errors[n] < 8.0 / n ** 2  # second order in the cell size
    assert errors[16] < errors[8] / 3


def test_plane_gives_a_flat_mesh_with_the_cross_section_area():
    grid = cube_tet_grid(5)
    vertices = grid.vertices.double()
    mesh = marching_tets(vertices, vertices[:, 2] - 0.3, grid.tets, grid.edges, grid.tet_edges)
    assert torch.allclose(mesh.vertices[:, 2], torch.full_like(mesh.vertices[:, 2], 0.3), atol=1e-12)
    assert torch.allclose(mesh.face_normals(), torch.tensor([0.0, 0.0, 1.0], dtype=D).expand(len(mesh.faces), 3))
    assert torch.isclose(face_areas(*mesh).sum(), torch.tensor(4.0, dtype=D))  # the 2 x 2 square at z = 0.3
    # a tilted plane: every vertex on it, every normal along +n (towards positive SDF)
    normal = torch.nn.functional.normalize(torch.tensor([0.3, -0.5, 0.8], dtype=D), dim=0)
    mesh = marching_tets(vertices, vertices @ normal - 0.1, grid.tets)  # edges from the sort-based path
    assert torch.allclose(mesh.vertices @ normal, torch.full((len(mesh.vertices),), 0.1, dtype=D), atol=1e-12)
    assert torch.allclose(mesh.face_normals(), normal.expand(len(mesh.faces), 3), atol=1e-9)
    assert normal_consistency(*mesh) < 1e-12


def test_each_sign_configuration_in_one_tet_follows_the_linear_sdf():
    """In one tet the SDF is linear, s(x) = s0 + g.(x - v0): its zero set is a plane, so the triangles must lie on
    it, with normals along +g (from inside to outside); 1 triangle for a lone vertex, 2 for a 2/2 split."""
    gen = torch.Generator().manual_seed(0)
    for code in range(1, 15):
        for _ in range(3):
            tet_vertices = torch.randn(4, 3, generator=gen, dtype=D)
            if torch.linalg.det(tet_vertices[1:] - tet_vertices[0]) < 0:
                tet_vertices = tet_vertices[[0, 2, 1, 3]]
            magnitude = 0.2 + torch.rand(4, generator=gen, dtype=D)
            sdf = torch.where(torch.tensor([code >> i & 1 for i in range(4)]).bool(), -magnitude, magnitude)
            mesh = marching_tets(tet_vertices, sdf, torch.tensor([[0, 1, 2, 3]]))
            lone = bin(code).count("1") in (1, 3)
            assert mesh.faces.shape[0] == (1 if lone else 2) and mesh.vertices.shape[0] == (3 if lone else 4)
            gradient = torch.linalg.solve(tet_vertices[1:] - tet_vertices[0], sdf[1:] - sdf[0])
            values = sdf[0] + (mesh.vertices - tet_vertices[0]) @ gradient
            assert torch.allclose(values, torch.zeros_like(values), atol=1e-9)
            unit_gradient = gradient / gradient.norm()
            normals = mesh.face_normals()
            assert torch.allclose(normals, unit_gradient.expand_as(normals), atol=1e-9), code


def test_random_sdf_mesh_is_oriented_and_only_open_on_the_grid_boundary():
    grid = cube_tet_grid(4)
    vertices = grid.vertices.double()
    sdf = torch.randn(len(vertices), generator=torch.Generator().manual_seed(1), dtype=D)
    mesh = marching_tets(vertices, sdf, grid.tets, grid.edges, grid.tet_edges)
    counts = directed_edge_counts(mesh.faces)
    assert all(c == 1 for c in counts.values())  # never the same direction twice: consistent orientation
    open_edges = [(a, b) for a, b in counts if (b, a) not in counts]
    assert open_edges  # a random field does cross the boundary
    for a, b in open_edges:  # a hole edge lies on one face of the cube
        ends = mesh.vertices[[a, b]]
        assert bool(((ends.abs() - 1.0).abs() < 1e-12).all(0).any())


def test_no_sign_change_gives_an_empty_mesh():
    model = DMTet(3).double()
    for value in (0.5, -0.5):
        with torch.no_grad():
            model.sdf.fill_(value)
        vertices, faces = model()
        assert vertices.shape == (0, 3) and faces.shape == (0, 3) and faces.dtype == torch.int64
        vertices.sum().backward()  # no crash on an empty graph either
        assert torch.equal(model.sdf.grad, torch.zeros_like(model.sdf))
        model.zero_grad()


def test_mesh_vertex_gradients_match_finite_differences():
    model = DMTet(2).double()
    gen = torch.Generator().manual_seed(3)
    magnitude = 0.2 + torch.rand(len(model.sdf), generator=gen, dtype=D)  # away from 0: signs stay put under FD
    sign = torch.where((model.grid_vertices - 0.1).norm(dim=-1) < 0.8, -1.0, 1.0).to(D)
    sdf = (sign * magnitude).requires_grad_()
    deformation = (0.5 * torch.randn(len(model.sdf), 3, generator=gen, dtype=D)).requires_grad_()

    def mesh_vertices(sdf, deformation):
        positions = model.grid_vertices + model.deformation_bound * torch.tanh(deformation)
        return marching_tets(positions, sdf, model.tets, model.edges, model.tet_edges).vertices

    assert mesh_vertices(sdf, deformation).shape[0] > 0
    assert torch.autograd.gradcheck(mesh_vertices, (sdf, deformation), eps=1e-6, atol=1e-7)

    def enclosed_volume(sdf, deformation):
        positions = model.grid_vertices + model.deformation_bound * torch.tanh(deformation)
        return mesh_volume(*marching_tets(positions, sdf, model.tets, model.edges, model.tet_edges))

    assert torch.autograd.gradcheck(enclosed_volume, (sdf, deformation), eps=1e-6, atol=1e-7)


def test_edge_vertex_is_the_linear_zero_crossing():
    vertices = torch.tensor([[0.0, 0, 0], [2.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]], dtype=D)
    sdf = torch.tensor([-1.0, 3.0, 1.0, 1.0], dtype=D, requires_grad=True)  # vertex 0 alone inside
    mesh = marching_tets(vertices, sdf, torch.tensor([[0, 1, 2, 3]]))
    on_x = mesh.vertices[(mesh.vertices[:, 1].abs() < 1e-12) & (mesh.vertices[:, 2].abs() < 1e-12)]
    assert torch.allclose(on_x, torch.tensor([[0.5, 0.0, 0.0]], dtype=D))  # 1/(1+3) of the way along 2 e_x
    # x = (p0 s1 - p1 s0) / (s1 - s0) = -2 s0 / (s1 - s0): dx/ds0 = -2 s1 / (s1 - s0)^2 = -6/16 and
    # dx/ds1 = 2 s0 / (s1 - s0)^2 = -2/16 (a larger outside value pulls the crossing towards the inside vertex)
    (grad,) = torch.autograd.grad(on_x[0, 0], sdf)
    assert torch.allclose(grad, torch.tensor([-6 / 16, -2 / 16, 0.0, 0.0], dtype=D))


# ----------------------------------------------------------------------------------------------- the module
def test_deformation_is_bounded_by_half_a_cell_per_axis():
    box = torch.tensor([[-1.0, -0.5, -0.25], [1.0, 0.5, 0.25]])
    model = DMTet(4, bbox=box).double()
    cell = (box[1] - box[0]).double() / 4
    assert torch.allclose(model.deformation_bound, 0.5 * cell)
    with torch.no_grad():
        model.deformation.copy_(1e3 * torch.randn(model.deformation.shape, dtype=D))
    offset = (model.vertex_positions() - model.grid_vertices).abs()
    assert bool((offset <= 0.5 * cell + 1e-12).all()) and bool((offset > 0.49 * cell).any())
    frozen = DMTet(4, bbox=box, deformable=False).double()
    with torch.no_grad():
        frozen.deformation.fill_(5.0)
    assert torch.equal(frozen.vertex_positions(), frozen.grid_vertices)
    assert not frozen.deformation.requires_grad


def test_state_dict_keeps_parameters_and_bbox_but_not_the_grid_tables():
    model = DMTet(3, bbox=0.7)
    keys = set(model.state_dict())
    assert keys == {"sdf", "deformation", "bbox"}
    with torch.no_grad():
        model.sdf.normal_()
    other = DMTet(3)
    other.load_state_dict(model.state_dict())
    assert torch.equal(other.sdf, model.sdf) and torch.equal(other.grid_vertices, model.grid_vertices)


def gaussian_blob(amplitude=40.0, sigma=0.3, center=CENTER):
    def density(points):
        return amplitude * torch.exp(-((points - center.to(points)) ** 2).sum(-1) / (2 * sigma ** 2))
    return density


def test_init_from_density_gaussian_blob_surface_at_the_threshold_radius():
    amplitude, sigma, threshold, n = 40.0, 0.3, 10.0, 16
    model = DMTet(n).double()
    level = model.init_from_density(gaussian_blob(amplitude, sigma), threshold=threshold, sdf_clamp=None)
    assert level == threshold and model.isosurface_threshold == threshold
    expected_radius = sigma * math.sqrt(2 * math.log(amplitude / threshold))  # where density == threshold
    vertices, faces = model()
    error = ((vertices - CENTER).norm(dim=-1) - expected_radius).abs().max()
    assert error < 2 / n  # within a cell (the density is not linear along an edge, so not exact)
    assert mesh_volume(vertices, faces) > 0
    inside = (model.grid_vertices - CENTER).norm(dim=-1) < expected_radius
    assert torch.equal(model.sdf < 0, inside)  # dense = inside = negative SDF


def test_init_from_density_auto_threshold_and_clamp():
    density_fn = gaussian_blob()
    model = DMTet(8).double()
    with torch.no_grad():
        model.deformation.fill_(0.3)
    level = model.init_from_density(density_fn)  # "auto", clamp 1 (threestudio)
    values = density_fn(model.grid_vertices)
    assert math.isclose(level, float(values[values > 1e-5].mean()), rel_tol=1e-12)
    assert level == auto_threshold(values)  # the export's rule
    assert torch.allclose(model.sdf, (level - values).clamp(-1, 1))
    assert bool((model.deformation == 0).all())  # the SDF describes the undeformed grid


def test_init_from_box_density_with_a_tight_bbox():
    half = 0.33  # density 10 inside the box |x|_inf < 0.33, 0 outside: a binary field (off the lattices)

    def box_density(points):
        return 10.0 * (points.abs().max(-1).values < half).to(points)

    bbox, level = surface_bbox(box_density, radius=1.0, threshold=5.0, resolution=20, dtype=D)
    lattice_cell = 2 / 20
    assert level == 5.0
    assert bool((bbox[0] < -half).all() and (bbox[1] > half).all())
    assert bool((bbox[1] <= half + lattice_cell + 0.1 * (2 * half + 2 * lattice_cell) + 1e-9).all())
    model = DMTet(10).double()
    model.init_from_density(box_density, threshold=level, bbox=bbox)
    assert torch.equal(model.bbox, bbox)
    vertices, _ = model()
    cell = float(model.cell_size.max())
    assert bool((vertices >= bbox[0]).all() and (vertices <= bbox[1]).all())
    # binary density: the surface vertices are the midpoints of the edges leaving the box
    distance = vertices.abs().max(-1).values
    assert bool(((distance - half).abs() < cell).all())


def test_init_without_a_surface_raises():
    model = DMTet(4)
    with pytest.raises(ValueError, match="no surface"):
        model.init_from_density(lambda p: torch.full(p.shape[:1], 3.0), threshold=5.0)
    with pytest.raises(ValueError):
        model.init_from_density(lambda p: torch.zeros(p.shape[:1]))  # "auto" on an empty field
    with pytest.raises(ValueError):
        model.init_from_density(gaussian_blob(), threshold="mean")


def test_to_trimesh_agrees_on_the_volume():
    trimesh = pytest.importorskip("trimesh")
    _, mesh = sphere_mesh(8)
    converted = mesh.to_trimesh()
    assert isinstance(converted, trimesh.Trimesh) and converted.is_watertight and converted.is_winding_consistent
    assert math.isclose(converted.volume, float(mesh.volume()), rel_tol=1e-9)
    assert isinstance(mesh, TriangleMesh)


# ----------------------------------------------------------------------------------------------- regularizers
def test_regularizers_on_a_flat_sheet():
    vertices, faces, interior = flat_grid(6)
    rotation = random_rotation(4)
    vertices = vertices @ rotation.T + torch.tensor([0.3, -1.0, 2.0], dtype=D)  # any plane, any place
    normal = rotation[:, 2]
    assert normal_consistency(vertices, faces) < 1e-12
    assert vertex_normal_consistency(vertices, faces) < 1e-12
    laplacian = uniform_laplacian(vertices, faces)
    assert torch.allclose(laplacian[interior], torch.zeros_like(laplacian[interior]), atol=1e-12)
    assert torch.allclose(laplacian @ normal, torch.zeros(len(vertices), dtype=D), atol=1e-12)  # in-plane only
    # lift one interior vertex (6 neighbours, all interior) by delta: its own term delta^2, each neighbour's
    # (delta / 6)^2, the in-plane (boundary) terms unchanged
    flat = laplacian_smoothness(vertices, faces)
    centre = 3 * 7 + 3
    delta = 0.2
    bumped = vertices.clone()
    bumped[centre] += delta * normal
    expected = flat + (delta ** 2 + 6 * (delta / 6) ** 2) / len(vertices)
    assert torch.isclose(laplacian_smoothness(bumped, faces), expected)
    assert normal_consistency(bumped, faces) > 0


def test_normal_consistency_of_a_hinge_and_a_fold():
    for angle in (30.0, 90.0, 150.0):
        theta = math.radians(angle)
        # two triangles on the shared edge (0,0,0)-(0,1,0), the second rotated by theta about it
        vertices = torch.tensor([[0.0, 0, 0], [0, 1, 0], [-1, 0.5, 0],
                                 [math.cos(theta), 0.5, math.sin(theta)]], dtype=D)
        faces = torch.tensor([[0, 1, 2], [1, 0, 3]])
        assert torch.isclose(normal_consistency(vertices, faces), torch.tensor(1 - math.cos(theta), dtype=D))
    # an m x m sheet folded by theta along x = m/2: m crease edges out of 3 m^2 - 2 m interior edges
    m, angle = 4, 40.0
    vertices, faces, _ = flat_grid(m, fold_deg=angle)
    assert edge_face_pairs(faces).shape[0] == 3 * m * m - 2 * m
    expected = m * (1 - math.cos(math.radians(angle))) / (3 * m * m - 2 * m)
    assert torch.isclose(normal_consistency(vertices, faces), torch.tensor(expected, dtype=D))


def test_laplacian_points_outward_on_a_sphere_and_threestudio_scale_identity():
    _, (vertices, faces) = sphere_mesh(6)
    on_sphere = CENTER + 0.6 * torch.nn.functional.normalize(vertices.detach() - CENTER, dim=-1)
    laplacian = uniform_laplacian(on_sphere, faces)
    # every vertex is extreme on the sphere, so it sits outside the mean of its neighbours
    assert bool(((laplacian * (on_sphere - CENTER)).sum(-1) > 0).all())
    assert laplacian_smoothness(on_sphere, faces) > 0
    # (D - A) v = D (v - mean of neighbours): threestudio's scale is the degree-weighted norm of ours
    degree = torch.bincount(mesh_edges(faces).reshape(-1), minlength=len(on_sphere)).to(D)
    expected = (degree * laplacian.norm(dim=-1)).mean()
    assert torch.isclose(graph_laplacian_norm(on_sphere, faces), expected)


def test_regularizer_gradients_match_finite_differences():
    vertices, faces, _ = flat_grid(3, fold_deg=25.0)
    noise = 0.05 * torch.randn(vertices.shape, generator=torch.Generator().manual_seed(5), dtype=D)
    vertices = (vertices + noise).requires_grad_()
    for regularizer in (normal_consistency, laplacian_smoothness, vertex_normal_consistency, graph_laplacian_norm):
        assert torch.autograd.gradcheck(lambda v: regularizer(v, faces), (vertices,), eps=1e-6, atol=1e-7), regularizer
