"""Differentiable rasterizer (l2vsd_core/mesh/rasterize.py): analytic scenes (coverage, barycentrics, depth test,
perspective-correct interpolation), conventions, gradients against finite differences (interpolate, texture,
antialias), antialias behaviour at silhouettes, batching/chunking, bad input, and torch-vs-nvdiffrast agreement
where nvdiffrast and CUDA exist."""
import math

import pytest
import torch

from l2vsd_core.mesh import rasterize as rz
from l2vsd_core.mesh.rasterize import antialias, edge_topology, interpolate, rasterize, texture

pytestmark = pytest.mark.usefixtures("one_thread")

D = torch.float64


def ortho(xy, z=0.0, dtype=D) -> torch.Tensor:
    """Clip positions [1, V, 4] with w = 1 (NDC = clip) from NDC xy [V, 2] and z (scalar or [V])."""
    xy = torch.as_tensor(xy, dtype=dtype)
    z = torch.as_tensor(z, dtype=dtype).expand(xy.shape[0])
    return torch.cat([xy, z[:, None], torch.ones(xy.shape[0], 1, dtype=dtype)], dim=1)[None]


def pixel_centres(height, width):
    """NDC centres [H, W] (x, y) with row 0 at the bottom, as documented."""
    y = (2 * torch.arange(height, dtype=D) + 1) / height - 1
    x = (2 * torch.arange(width, dtype=D) + 1) / width - 1
    return x[None, :].expand(height, width), y[:, None].expand(height, width)


def screen_barycentrics(tri_xy, x, y):
    """Closed-form 2D barycentrics (weights of vertices 0, 1, 2) of points (x, y) in the triangle tri_xy [3, 2]."""
    (x0, y0), (x1, y1), (x2, y2) = tri_xy.tolist()
    det = (y1 - y2) * (x0 - x2) + (x2 - x1) * (y0 - y2)
    b0 = ((y1 - y2) * (x - x2) + (x2 - x1) * (y - y2)) / det
    b1 = ((y2 - y0) * (x - x2) + (x0 - x2) * (y - y2)) / det
    return b0, b1, 1 - b0 - b1


def perspective(fovy_deg=60.0, aspect=1.0, near=0.1, far=10.0) -> torch.Tensor:
    """OpenGL projection matrix (camera at the origin looking down -z)."""
    f = 1 / math.tan(math.radians(fovy_deg) / 2)
    return torch.tensor(
        [[f / aspect, 0, 0, 0], [0, f, 0, 0], [0, 0, (far + near) / (near - far), 2 * far * near / (near - far)],
         [0, 0, -1, 0]],
        dtype=D,
    )


def project(points, proj):
    """View-space points [V, 3] -> clip [1, V, 4]."""
    return (torch.cat([points, torch.ones(points.shape[0], 1, dtype=points.dtype)], 1) @ proj.T)[None]


# --------------------------------------------------------------------------------------------------------------
# Analytic scenes


def test_single_triangle_coverage_barycentrics_and_ids():
    H, W = 12, 16  # non-square so x/y mix-ups show
    tri_xy = torch.tensor([[-0.7, -0.6], [0.8, -0.3], [-0.2, 0.75]], dtype=D)
    z = torch.tensor([0.1, -0.2, 0.4], dtype=D)
    pos = ortho(tri_xy, z)
    tri = torch.tensor([[0, 1, 2]])
    rast, rast_db = rasterize(pos, tri, (H, W), backend="torch")
    assert rast_db is None and rast.shape == (1, H, W, 4) and rast.dtype == D

    x, y = pixel_centres(H, W)
    b0, b1, b2 = screen_barycentrics(tri_xy, x, y)
    inside = (b0 > 0) & (b1 > 0) & (b2 > 0)
    assert (b0.abs().min() > 1e-6) and (b1.abs().min() > 1e-6) and (b2.abs().min() > 1e-6)  # no centre on an edge
    covered = rast[0, ..., 3] > 0
    assert torch.equal(covered, inside) and 20 < int(inside.sum()) < H * W - 20
    assert torch.all(rast[0, ..., 3][covered] == 1)  # triangle id + 1
    assert torch.all(rast[0][~covered] == 0)  # background: all channels zero
    # nvdiffrast's convention: (u, v) = weights of tri[:, 0] and tri[:, 1]; third vertex gets 1 - u - v.
    torch.testing.assert_close(rast[0, ..., 0][covered], b0[covered], rtol=0, atol=1e-12)
    torch.testing.assert_close(rast[0, ..., 1][covered], b1[covered], rtol=0, atol=1e-12)
    depth = b0 * z[0] + b1 * z[1] + b2 * z[2]
    torch.testing.assert_close(rast[0, ..., 2][covered], depth[covered], rtol=0, atol=1e-12)


def test_row_zero_is_the_bottom_and_x_grows_right():
    # A triangle in the top-right NDC quadrant covers only upper rows (high index) and right columns.
    pos = ortho([[0.2, 0.2], [0.9, 0.2], [0.9, 0.9]])
    rast, _ = rasterize(pos, torch.tensor([[0, 1, 2]]), (8, 8), backend="torch")
    rows, cols = (rast[0, ..., 3] > 0).nonzero(as_tuple=True)
    assert rows.numel() > 0 and rows.min() >= 4 and cols.min() >= 4


def test_square_from_two_triangles_exact_pixels_no_cracks():
    # Square [-0.5, 0.5]^2 at 8x8: centres +-0.125, +-0.375 inside, +-0.625 outside; the shared diagonal passes
    # exactly through 4 pixel centres, which must be covered (no cracks) by exactly one of the two triangles.
    pos = ortho([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    tri = torch.tensor([[0, 1, 2], [0, 2, 3]])
    rast, _ = rasterize(pos, tri, (8, 8), backend="torch")
    ids = rast[0, ..., 3]
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:6, 2:6] = True
    assert torch.equal(ids > 0, expected)
    x, y = pixel_centres(8, 8)
    assert torch.all(ids[(y < x) & expected] == 1) and torch.all(ids[(y > x) & expected] == 2)
    assert torch.all(ids[(y == x) & expected] == 1)  # equal depth on the shared edge: the lower id wins
    # Each pixel's barycentrics are those of its own triangle (valid: all three in [0, 1]).
    u, v = rast[0, ..., 0][expected], rast[0, ..., 1][expected]
    assert torch.all(u >= 0) and torch.all(v >= 0) and torch.all(u + v <= 1 + 1e-12)


def test_winding_does_not_matter():
    cw = ortho([[-0.7, -0.6], [-0.2, 0.75], [0.8, -0.3]])
    ccw = ortho([[-0.7, -0.6], [0.8, -0.3], [-0.2, 0.75]])
    a, _ = rasterize(cw, torch.tensor([[0, 1, 2]]), (10, 10), backend="torch")
    b, _ = rasterize(ccw, torch.tensor([[0, 1, 2]]), (10, 10), backend="torch")
    assert torch.equal(a[..., 3] > 0, b[..., 3] > 0) and int((a[..., 3] > 0).sum()) > 10
    # Vertex 0 is the same in both, so u agrees; v is the weight of the second listed vertex (1 - u - v in the other).
    mask = a[..., 3] > 0
    torch.testing.assert_close(a[..., 0][mask], b[..., 0][mask])
    torch.testing.assert_close(a[..., 1][mask], (1 - b[..., 0] - b[..., 1])[mask])


@pytest.mark.parametrize("order", [(0, 1), (1, 0)])
def test_depth_test_nearest_z_over_w_wins(order):
    near = [[-0.8, -0.8], [0.6, -0.8], [-0.8, 0.6]]  # z = -0.3
    far = [[-0.4, -0.4], [0.8, -0.4], [-0.4, 0.8]]  # z = +0.2
    xy = [near, far]
    zs = [-0.3, 0.2]
    pos = torch.cat([ortho(xy[i], zs[i]) for i in order], dim=1)
    tri = torch.tensor([[0, 1, 2], [3, 4, 5]])
    rast, _ = rasterize(pos, tri, (16, 16), backend="torch")
    ids, depth = rast[0, ..., 3], rast[0, ..., 2]
    x, y = pixel_centres(16, 16)
    in_near = (x > -0.8) & (y > -0.8) & (x + y < -0.2)
    in_far = (x > -0.4) & (y > -0.4) & (x + y < 0.4)
    near_id = order.index(0) + 1
    far_id = order.index(1) + 1
    assert int((in_near & in_far).sum()) > 5
    assert torch.all(ids[in_near] == near_id)  # including the overlap
    assert torch.all(ids[in_far & ~in_near] == far_id)
    torch.testing.assert_close(depth[in_near], torch.full_like(depth[in_near], -0.3))
    torch.testing.assert_close(depth[in_far & ~in_near], torch.full_like(depth[in_far & ~in_near], 0.2))


def test_depth_clip_and_behind_camera_culling():
    tri = torch.tensor([[0, 1, 2]])
    big = [[-0.9, -0.9], [0.9, -0.9], [-0.9, 0.9]]
    # Wholly beyond the far plane: nothing.
    rast, _ = rasterize(ortho(big, 1.5), tri, (8, 8), backend="torch")
    assert not torch.any(rast)
    # z/w from -1.5 (vertex 0) to 0.5: only samples with z/w >= -1 survive (OpenGL's near clip).
    rast, _ = rasterize(ortho(big, torch.tensor([-1.5, 0.5, 0.5], dtype=D)), tri, (16, 16), backend="torch")
    x, y = pixel_centres(16, 16)
    b0, b1, b2 = screen_barycentrics(torch.tensor(big, dtype=D), x, y)
    inside = (b0 > 0) & (b1 > 0) & (b2 > 0)
    depth = -1.5 * b0 + 0.5 * (b1 + b2)
    assert torch.equal(rast[0, ..., 3] > 0, inside & (depth >= -1))
    assert 0 < int((inside & (depth < -1)).sum()) and 0 < int((inside & (depth >= -1)).sum())
    # A vertex behind the camera (w <= 0): the triangle is culled whole (documented).
    pos = ortho(big)
    pos[0, 0, 3] = -0.5
    rast, _ = rasterize(pos, tri, (8, 8), backend="torch")
    assert not torch.any(rast)
    # Degenerate (zero screen area) triangles draw nothing.
    rast, _ = rasterize(ortho([[-0.5, -0.5], [0.0, 0.0], [0.5, 0.5]]), tri, (8, 8), backend="torch")
    assert not torch.any(rast)


def test_perspective_correct_interpolation_matches_ray_plane_intersection():
    H, W = 24, 32
    proj = perspective(fovy_deg=50.0, aspect=W / H)
    # A square on a plane tilted about two axes, 1.5-3 units in front of the camera (view space, looking down -z).
    centre = torch.tensor([0.1, -0.05, -2.2], dtype=D)
    e1 = torch.tensor([0.9, 0.0, 0.5], dtype=D)
    e1 = e1 / e1.norm() * 0.8
    e2 = torch.cross(torch.tensor([0.0, 0.3, 1.0], dtype=D), e1, dim=0)
    e2 = torch.cross(e1, e2, dim=0)
    e2 = e2 / e2.norm() * 0.7  # orthogonal to e1, tilted towards the camera
    corners = torch.stack([centre - e1 - e2, centre + e1 - e2, centre + e1 + e2, centre - e1 + e2])
    tri = torch.tensor([[0, 1, 2], [0, 2, 3]])
    pos = project(corners, proj)
    rast, _ = rasterize(pos, tri, (H, W), backend="torch")
    xyz, none = interpolate(corners[None], rast, tri, backend="torch")
    assert none is None

    # Independent reference: intersect each pixel's ray with the plane, in float64.
    x, y = pixel_centres(H, W)
    f = 1 / math.tan(math.radians(50.0) / 2)
    ray = torch.stack([x * (W / H) / f, y / f, -torch.ones_like(x)], dim=-1)
    normal = torch.cross(e1, e2, dim=0)
    hit = ray * ((centre @ normal) / (ray @ normal))[..., None]
    s = (hit - centre) @ e1 / (e1 @ e1)
    t = (hit - centre) @ e2 / (e2 @ e2)
    inside = (s.abs() < 1) & (t.abs() < 1)
    margin = torch.minimum(1 - s.abs(), 1 - t.abs()).abs()
    assert margin.min() > 1e-6 and int(inside.sum()) > 100
    covered = rast[0, ..., 3] > 0
    assert torch.equal(covered, inside)
    torch.testing.assert_close(xyz[0][covered], hit[covered], rtol=0, atol=1e-10)
    assert torch.all(xyz[0][~covered] == 0)
    # z/w is the projected depth of the same point; screen-linear interpolation would be visibly off.
    clip = torch.cat([hit, torch.ones_like(hit[..., :1])], -1) @ proj.T
    torch.testing.assert_close(rast[0, ..., 2][covered], (clip[..., 2] / clip[..., 3])[covered], rtol=0, atol=1e-10)
    b = torch.stack([rast[0, ..., 0], rast[0, ..., 1]], -1)[covered]
    assert (b - b.round(decimals=1)).abs().max() > 1e-3  # sanity: barycentrics are not trivial


def test_interpolate_uses_tri_order_for_u_v():
    # One-hot attributes per vertex reveal which vertex each barycentric belongs to, whatever the index order.
    pos = ortho([[-0.8, -0.7], [0.7, -0.5], [0.0, 0.8]])
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        tri = torch.tensor([order])
        rast, _ = rasterize(pos, tri, (10, 10), backend="torch")
        onehot, _ = interpolate(torch.eye(3, dtype=D), rast, tri, backend="torch")
        mask = rast[0, ..., 3] > 0
        u, v = rast[0, ..., 0], rast[0, ..., 1]
        torch.testing.assert_close(onehot[0, ..., order[0]][mask], u[mask])
        torch.testing.assert_close(onehot[0, ..., order[1]][mask], v[mask])
        torch.testing.assert_close(onehot[0, ..., order[2]][mask], (1 - u - v)[mask])
    # And with positions: interpolating the NDC xy gives back each pixel centre.
    xy, _ = interpolate(pos[0, :, :2], rast, tri, backend="torch")
    x, y = pixel_centres(10, 10)
    torch.testing.assert_close(xy[0][mask], torch.stack([x, y], -1)[mask], rtol=0, atol=1e-12)


def test_batch_of_views_broadcast_and_2d_positions():
    torch.manual_seed(0)
    base = torch.tensor([[-0.8, -0.7, 0.1, 1.0], [0.7, -0.5, 0.0, 1.0], [0.0, 0.8, -0.1, 1.0], [0.9, 0.9, 0.3, 1.0]],
                        dtype=D)
    tri = torch.tensor([[0, 1, 2], [1, 3, 2]])
    views = torch.stack([base, base * torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=D), base * 1.3])
    rast, _ = rasterize(views, tri, (12, 10), backend="torch")
    assert rast.shape == (3, 12, 10, 4)
    for i in range(3):
        single, _ = rasterize(views[i], tri, (12, 10), backend="torch")  # [V, 4] = one view
        assert torch.equal(rast[i : i + 1], single)
    assert not torch.equal(rast[0], rast[1])
    attr = torch.randn(4, 3, dtype=D)
    a, _ = interpolate(attr, rast, tri, backend="torch")
    b, _ = interpolate(attr[None].expand(3, 4, 3), rast, tri, backend="torch")
    c, _ = interpolate(attr[None], rast, tri, backend="torch")
    assert torch.equal(a, b) and torch.equal(a, c)
    # antialias per view: the batch equals the views done one by one, and a batch-1 pos_clip broadcasts.
    aa = antialias(a, rast, views, tri, backend="torch")
    assert aa.dtype == a.dtype and not torch.equal(aa, a)
    for i in range(3):
        assert torch.equal(aa[i : i + 1], antialias(a[i : i + 1], rast[i : i + 1], views[i], tri, backend="torch"))
    same = rast[:1].expand(3, -1, -1, -1)
    aa1 = antialias(a[:1].expand(3, -1, -1, -1), same, views[0], tri, backend="torch")
    assert torch.equal(aa1[2], aa[0])


def test_chunking_and_bands_do_not_change_the_result():
    torch.manual_seed(1)
    n = 40
    pos = torch.cat([torch.rand(1, 3 * n, 2, dtype=D) * 2.4 - 1.2, torch.rand(1, 3 * n, 1, dtype=D) * 1.8 - 0.9,
                     torch.ones(1, 3 * n, 1, dtype=D)], -1)
    tri = torch.arange(3 * n).view(n, 3)
    full, _ = rasterize(pos, tri, (20, 24), backend="torch")
    for max_pairs in (1, 7, 100):
        chunked, _ = rasterize(pos, tri, (20, 24), backend="torch", max_pairs=max_pairs)
        assert torch.equal(full, chunked)
    assert int((full[..., 3] > 0).sum()) > 300 and full[..., 3].unique().numel() > 10


def test_closed_mesh_is_watertight():
    verts, faces = rz._uv_sphere(3000)
    pos = rz._perspective_view(verts)  # float32
    rast, _ = rasterize(pos, faces, (96, 96), backend="torch")
    covered = rast[0, ..., 3] > 0
    # The sphere projects to a disk centred in the image; every pixel well inside it must be covered.
    x, y = pixel_centres(96, 96)
    radius = (x[covered].abs().max() + y[covered].abs().max()) / 2
    assert 0.4 < radius < 0.8
    assert torch.all(covered[(x**2 + y**2).sqrt() < radius - 0.05])
    # The depth test hides the back half: every visible triangle has the same screen winding (front-facing), while
    # the mesh as a whole has both windings on screen.
    ids = rast[0, ..., 3][covered].long().unique() - 1
    xy = pos[0, :, :2] / pos[0, :, 3:]
    corners = xy[faces]
    winding = torch.sign((corners[:, 1, 0] - corners[:, 0, 0]) * (corners[:, 2, 1] - corners[:, 0, 1])
                         - (corners[:, 2, 0] - corners[:, 0, 0]) * (corners[:, 1, 1] - corners[:, 0, 1]))
    assert ids.numel() > 500 and winding[ids].unique().numel() == 1
    assert (winding == -winding[ids][0]).sum() > 1000


def test_empty_mesh_and_nothing_visible():
    pos = ortho([[0.0, 0.0], [0.5, 0.0], [0.0, 0.5]])
    empty = torch.zeros(0, 3, dtype=torch.long)
    rast, _ = rasterize(pos, empty, (6, 7), backend="torch")
    assert rast.shape == (1, 6, 7, 4) and not torch.any(rast)
    rast0, _ = rasterize(torch.zeros(2, 0, 4), empty, (5, 5), backend="torch")
    assert rast0.shape == (2, 5, 5, 4) and not torch.any(rast0)
    out, _ = interpolate(torch.ones(3, 2), rast.float(), empty, backend="torch")
    assert out.shape == (1, 6, 7, 2) and not torch.any(out)
    color = torch.rand(1, 6, 7, 3)
    assert torch.equal(antialias(color, rast.float(), pos.float(), empty, backend="torch"), color)
    assert edge_topology(empty).shape == (0, 3)


# --------------------------------------------------------------------------------------------------------------
# Gradients


def test_interpolate_gradients_match_finite_differences():
    proj = perspective(fovy_deg=60.0)
    points = torch.tensor([[-0.9, -0.8, -2.0], [1.1, -0.6, -2.6], [0.1, 0.9, -1.7], [1.2, 0.9, -2.2]], dtype=D)
    tri = torch.tensor([[0, 1, 2], [1, 3, 2]])
    pos = project(points, proj).requires_grad_(True)
    attr = torch.randn(1, 4, 3, dtype=D, requires_grad=True)

    def render(p, a):
        rast, _ = rasterize(p, tri, (9, 8), backend="torch")
        return interpolate(a, rast, tri, backend="torch")[0]

    assert int((render(pos, attr).abs().sum(-1) > 0).sum()) > 20
    assert torch.autograd.gradcheck(render, (pos, attr), eps=1e-6, atol=1e-6, rtol=1e-4)
    # Positions really receive gradient through the barycentrics.
    render(pos, attr).square().sum().backward()
    assert pos.grad[0, :, :2].abs().sum() > 0 and pos.grad[0, :, 3].abs().sum() > 0


def test_texture_conventions_and_closed_form():
    tex = torch.tensor([[[1.0], [2.0]], [[3.0], [4.0]]], dtype=D)[None]  # row 0 (bottom) = 1, 2; row 1 = 3, 4
    uv = torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.5, 0.5], [0.0, 0.0], [0.5, 0.25]],
                      dtype=D).view(1, 1, 6, 2)
    for mode in ("wrap", "clamp", "zero"):
        out = texture(tex, uv, filter_mode="linear", boundary_mode=mode, backend="torch")[0, 0, :, 0]
        torch.testing.assert_close(out[:4], torch.tensor([1.0, 2.0, 3.0, 2.5], dtype=D))  # texel centres, middle
        torch.testing.assert_close(out[5], torch.tensor(1.5, dtype=D))
    modes = ("wrap", "clamp", "zero")
    corner = {m: texture(tex, uv, boundary_mode=m, backend="torch")[0, 0, 4, 0].item() for m in modes}
    assert corner == pytest.approx({"wrap": 2.5, "clamp": 1.0, "zero": 0.25})  # (0,0): all 4 wrap / texel 0 / 1/4
    near = texture(tex, uv, filter_mode="nearest", backend="torch")[0, 0, :, 0]
    torch.testing.assert_close(near[:3], torch.tensor([1.0, 2.0, 3.0], dtype=D))
    # wrap: uv + integer is the same sample
    torch.testing.assert_close(texture(tex, uv + 3.0, backend="torch"), texture(tex, uv, backend="torch"))
    # batch-1 texture broadcasts over uv's batch
    out = texture(tex, uv.expand(3, 1, 6, 2), backend="torch")
    assert out.shape == (3, 1, 6, 1) and torch.equal(out[0], out[2])


@pytest.mark.parametrize("boundary_mode", ["wrap", "clamp", "zero"])
def test_texture_gradients_match_finite_differences(boundary_mode):
    torch.manual_seed(2)
    tex = torch.randn(2, 5, 4, 3, dtype=D, requires_grad=True)
    uv = (torch.rand(2, 3, 4, 2, dtype=D) * 1.4 - 0.2).requires_grad_(True)  # some outside [0, 1]
    assert torch.autograd.gradcheck(
        lambda t, c: texture(t, c, filter_mode="linear", boundary_mode=boundary_mode, backend="torch"),
        (tex, uv), eps=1e-6, atol=1e-6, rtol=1e-4,
    )


def edge_scene(x_right, bottom=-0.52, top=0.57):
    """Two triangles forming a quad whose right edge runs from (x_right[0], bottom) to (x_right[1], top), w = 1."""
    left = torch.tensor([[-0.55, bottom], [-0.55, top]], dtype=D)
    right = torch.stack([torch.stack([x_right[0], torch.tensor(bottom, dtype=D)]),
                         torch.stack([x_right[1], torch.tensor(top, dtype=D)])])
    xy = torch.cat([left[:1], right, left[1:]])  # 0 bottom-left, 1 bottom-right, 2 top-right, 3 top-left
    pos = torch.cat([xy, torch.zeros(4, 1, dtype=D), torch.ones(4, 1, dtype=D)], 1)[None]
    return pos, torch.tensor([[0, 1, 2], [0, 2, 3]])


def coverage(pos, tri, res=(16, 16), aa=True):
    rast, _ = rasterize(pos, tri, res, backend="torch")
    ones = torch.ones(1, pos.shape[1], 1, dtype=D)
    mask, _ = interpolate(ones, rast, tri, backend="torch")
    return antialias(mask, rast, pos, tri, backend="torch") if aa else mask


def test_antialias_vertical_edge_gives_exact_box_filter_coverage_gradient():
    # Moving a vertical silhouette edge by dx (NDC) changes the box-filtered coverage of each row by dx * W / 2
    # pixels: d(sum)/dx = rows * W / 2 exactly, and the summed coverage is continuous across pixel centres.  The quad
    # spans the image vertically: where two silhouette edges meet inside a pixel (a corner) the per-axis
    # approximation is not continuous (documented).
    H, W = 16, 16
    rows = H
    sums, grads = [], []
    xs = torch.linspace(0.26, 0.52, 27, dtype=D)  # sweeps across the centres at 0.3125 and 0.4375 (and t = 1/2)
    for x in xs:
        xr = torch.stack([x, x]).requires_grad_(True)
        pos, tri = edge_scene(xr, bottom=-1.3, top=1.3)
        total = coverage(pos, tri, (H, W)).sum()
        (g,) = torch.autograd.grad(total, xr)
        sums.append(total.item())
        grads.append(g.sum().item())
    assert grads == pytest.approx([rows * W / 2] * len(xs), rel=1e-9)
    steps = torch.diff(torch.tensor(sums, dtype=D))
    torch.testing.assert_close(steps, torch.full_like(steps, rows * W / 2 * (xs[1] - xs[0]).item()), rtol=1e-9, atol=0)
    # Without antialiasing the same sum jumps by whole rows and has no positional gradient at all.
    xr = torch.stack([xs[0], xs[0]]).requires_grad_(True)
    pos, tri = edge_scene(xr, bottom=-1.3, top=1.3)
    plain = coverage(pos, tri, (H, W), aa=False).sum()
    (g,) = torch.autograd.grad(plain, xr, allow_unused=True)
    assert g is None or torch.all(g == 0)


def test_antialias_slanted_edge_gradient_matches_finite_differences_and_sign():
    weights = torch.rand(1, 16, 16, 1, dtype=D, generator=torch.Generator().manual_seed(3)) + 0.5

    def loss(x_right):
        pos, tri = edge_scene(x_right)
        return (coverage(pos, tri) * weights).sum()

    x0 = torch.tensor([0.33, 0.47], dtype=D, requires_grad=True)  # a slanted right edge
    (grad,) = torch.autograd.grad(loss(x0), x0)
    step = 1e-5
    x = x0.detach()
    fd = torch.stack([(loss(x + step * e) - loss(x - step * e)) / (2 * step) for e in torch.eye(2, dtype=D)])
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)
    assert torch.all(grad > 0)  # moving the edge outward (+x) increases the covered area
    # Full gradcheck of the antialiased image w.r.t. every clip coordinate of a perspective triangle.
    proj = perspective(fovy_deg=60.0)
    points = torch.tensor([[-0.6, -0.5, -2.0], [0.7, -0.3, -2.6], [0.05, 0.7, -1.7]], dtype=D)
    pos = project(points, proj).requires_grad_(True)
    tri = torch.tensor([[0, 1, 2]])
    colour = torch.tensor([[0.2, 0.9], [0.7, 0.1], [0.5, 0.5]], dtype=D)[None]

    def render(p):
        rast, _ = rasterize(p, tri, (10, 12), backend="torch")
        return antialias(interpolate(colour, rast, tri, backend="torch")[0], rast, p, tri, backend="torch")

    changed = (render(pos) - interpolate(colour, rasterize(pos, tri, (10, 12), backend="torch")[0], tri)[0]).abs()
    assert int((changed.sum(-1) > 1e-9).sum()) > 8
    assert torch.autograd.gradcheck(render, (pos,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_antialias_without_it_coverage_gradient_is_zero_with_it_points_outward():
    pos = ortho([[-0.62, -0.55], [0.58, -0.41], [-0.05, 0.66]]).requires_grad_(True)
    tri = torch.tensor([[0, 1, 2]])
    plain = coverage(pos, tri, aa=False).sum()
    (g_plain,) = torch.autograd.grad(plain, pos)
    assert torch.all(g_plain == 0)
    (g_aa,) = torch.autograd.grad(coverage(pos, tri).sum(), pos)
    centroid = pos.detach()[0, :, :2].mean(0)
    outward = pos.detach()[0, :, :2] - centroid
    # Pushing every vertex away from the centroid grows the triangle: the coverage gradient must agree.
    assert torch.all((g_aa[0, :, :2] * outward).sum(-1) > 0)


def test_antialias_blends_silhouettes_and_folds_but_not_interior_edges():
    tri = torch.tensor([[0, 1, 2], [2, 1, 3]])
    # Triangle A, right edge x = 0.4 (between centres 0.3125 and 0.4375: crossing t = 0.7) shared with triangle B.
    a = [[-0.6, -0.6], [0.4, -0.6], [0.4, 0.6]]
    colour = torch.tensor([[1.0], [1.0], [1.0], [0.0]], dtype=D)[None]  # B's third vertex darker

    def run(third_xy, third_z):
        pos = torch.cat([ortho(a, 0.0), ortho([third_xy], third_z)], dim=1)
        rast, _ = rasterize(pos, tri, (16, 16), backend="torch")
        col, _ = interpolate(colour, rast, tri, backend="torch")
        return rast, col, antialias(col, rast, pos, tri, backend="torch")

    # Continuous surface: B continues to the right, so x = 0.4 is an interior edge and is left alone.
    rast, col, aa = run([1.0, 0.0], 0.0)
    # Rows 5-10 (|y| < 0.35) are away from the outer silhouettes; there columns 10 | 11 straddle the shared edge.
    assert torch.all(rast[0, 5:11, 10, 3] == 1) and torch.all(rast[0, 5:11, 11, 3] == 2)
    changed = (aa - col).abs()[0, ..., 0] > 1e-12
    assert not torch.any(changed[5:11, 10:12]) and torch.any(changed)  # outer silhouettes still blended
    # Fold: B's third vertex on A's side, behind A; the edge x = 0.4 is now a silhouette against the background.
    rast, col, aa = run([-0.2, 0.0], 0.5)
    rows = torch.arange(16)
    y = (2 * rows + 1) / 16 - 1
    on_edge = (y > -0.6) & (y < 0.6) & (rast[0, :, 10, 3] > 0)
    assert int(on_edge.sum()) >= 6 and torch.all(rast[0, on_edge, 11, 3] == 0)
    # Outer pixel (column 11) takes t - 1/2 = 0.2 of the inner colour; the inner colour is 1 there (A).
    torch.testing.assert_close(aa[0, on_edge, 11, 0], torch.full((int(on_edge.sum()),), 0.2, dtype=D))


def test_antialias_occlusion_against_another_surface():
    # A front triangle over a big back triangle: the front triangle's edge is a silhouette against the back one.
    pos = torch.cat([ortho([[-0.9, -0.9], [0.9, -0.9], [-0.9, 0.9]], 0.5),
                     ortho([[-0.5, -0.5], [0.3, -0.5], [-0.5, 0.32]], -0.5)], dim=1).requires_grad_(True)
    tri = torch.tensor([[0, 1, 2], [3, 4, 5]])
    colour = torch.tensor([[0.0]] * 3 + [[1.0]] * 3, dtype=D)[None]
    rast, _ = rasterize(pos, tri, (16, 16), backend="torch")
    col, _ = interpolate(colour, rast, tri, backend="torch")
    aa = antialias(col, rast, pos, tri, backend="torch")
    assert torch.all(aa >= -1e-12) and torch.all(aa <= 1 + 1e-12)
    aa.sum().backward()
    front = pos.grad[0, 3:, :2]
    assert front.abs().sum() > 0
    outward = pos.detach()[0, 3:, :2] - pos.detach()[0, 3:, :2].mean(0)
    assert torch.all((front * outward).sum(-1) > 0)


def test_edge_topology():
    tri = torch.tensor([[0, 1, 2], [2, 1, 3], [3, 1, 4]])
    topo = edge_topology(tri)
    # Edge k of triangle f joins tri[f, k+1] and tri[f, k+2]; entry 3 g + l names the neighbour's copy.
    assert topo.tolist() == [[3 * 1 + 2, -1, -1], [3 * 2 + 2, -1, 3 * 0 + 0], [-1, -1, 3 * 1 + 0]]


# --------------------------------------------------------------------------------------------------------------
# Bad input and the backend switch


def test_bad_input_errors_name_the_problem():
    pos = ortho([[0.0, 0.0], [0.5, 0.0], [0.0, 0.5]])
    tri = torch.tensor([[0, 1, 2]])
    with pytest.raises(ValueError, match=r"pos_clip must have shape \[B, V, 4\]"):
        rasterize(pos[..., :3], tri, (4, 4))
    with pytest.raises(TypeError, match="pos_clip must be a floating-point"):
        rasterize(pos.long(), tri, (4, 4))
    with pytest.raises(TypeError, match="tri must be an integer tensor"):
        rasterize(pos, tri.float(), (4, 4))
    with pytest.raises(ValueError, match=r"tri must have shape \[F, 3\]"):
        rasterize(pos, tri[:, :2], (4, 4))
    with pytest.raises(ValueError, match="vertex index 3, outside"):
        rasterize(pos, torch.tensor([[0, 1, 3]]), (4, 4))
    with pytest.raises(ValueError, match="vertex index -1, outside"):
        rasterize(pos, torch.tensor([[0, -1, 2]]), (4, 4))
    with pytest.raises(ValueError, match="resolution"):
        rasterize(pos, tri, (4, 0))
    with pytest.raises(ValueError, match="resolution"):
        rasterize(pos, tri, 4)
    with pytest.raises(ValueError, match="backend must be one of"):
        rasterize(pos, tri, (4, 4), backend="opengl")
    rast, _ = rasterize(pos, tri, (4, 4))
    with pytest.raises(ValueError, match=r"rast must have shape \[B, H, W, 4\]"):
        interpolate(torch.ones(3, 2), rast[..., :3], tri)
    with pytest.raises(ValueError, match="attr batch 2 must be 1 or rast's batch 1"):
        interpolate(torch.ones(2, 3, 2, dtype=D), rast, tri)
    with pytest.raises(ValueError, match="vertex index 2, outside"):
        interpolate(torch.ones(2, 2, dtype=D), rast, tri)  # attr has fewer vertices than tri uses
    with pytest.raises(ValueError, match="rast refers to triangle 0 but tri has only 0"):
        interpolate(torch.ones(3, 2, dtype=D), rast, torch.zeros(0, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"uv must have shape \[B, H, W, 2\]"):
        texture(torch.ones(1, 2, 2, 3), torch.zeros(1, 4, 4, 3))
    with pytest.raises(ValueError, match="needs mipmaps"):
        texture(torch.ones(1, 2, 2, 3), torch.zeros(1, 4, 4, 2), filter_mode="linear-mipmap-linear", backend="torch")
    with pytest.raises(ValueError, match="boundary_mode must be one of"):
        texture(torch.ones(1, 2, 2, 3), torch.zeros(1, 4, 4, 2), boundary_mode="mirror")
    with pytest.raises(ValueError, match=r"color must have shape \[B, H, W, C\] matching rast"):
        antialias(torch.ones(1, 5, 4, 1), rast, pos, tri)
    with pytest.raises(ValueError, match="topology must be edge_topology"):
        antialias(torch.ones(1, 4, 4, 1, dtype=D), rast, pos, tri, topology=torch.zeros(2, 3, dtype=torch.long))


def test_backend_switch_without_nvdiffrast(monkeypatch):
    pos = ortho([[0.0, 0.0], [0.5, 0.0], [0.0, 0.5]])
    tri = torch.tensor([[0, 1, 2]])
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        rasterize(pos, tri, (4, 4), backend="nvdiffrast")  # CPU tensors
    # "auto" on CPU tensors is the torch backend, bit for bit.
    assert torch.equal(rasterize(pos, tri, (6, 6))[0], rasterize(pos, tri, (6, 6), backend="torch")[0])
    # CUDA present but nvdiffrast missing: the error names the fix.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        rz._import_nvdiffrast()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(__import__("sys").modules, "nvdiffrast", None)  # makes the import fail
    monkeypatch.setitem(__import__("sys").modules, "nvdiffrast.torch", None)
    with pytest.raises(RuntimeError, match="nvdiffrast is not importable.*backend='torch'"):
        rz._import_nvdiffrast()


def test_no_nvdiffrast_import_at_module_top():
    import sys
    from pathlib import Path

    src = Path(rz.__file__).read_text()
    top = src.split("def ", 1)[0]
    assert "import nvdiffrast" not in top
    assert "nvdiffrast" not in sys.modules or sys.modules["nvdiffrast"] is None or rz.nvdiffrast_available()


# --------------------------------------------------------------------------------------------------------------
# Torch backend vs nvdiffrast (only where both exist)


@pytest.mark.skipif(not rz.nvdiffrast_available(), reason="needs CUDA and nvdiffrast")
def test_torch_backend_agrees_with_nvdiffrast():
    dev = torch.device("cuda")
    verts, faces = rz._uv_sphere(2000)
    pos = (rz._perspective_view(verts) + 0.01 * torch.randn(1, verts.shape[0], 4) * torch.tensor([1, 1, 0, 0])).to(dev)
    faces = faces.to(dev)
    res = (96, 128)
    r_t, _ = rasterize(pos, faces, res, backend="torch")
    r_n, db = rasterize(pos, faces, res, backend="nvdiffrast")
    assert db is not None and r_n.shape == r_t.shape
    same = r_t[..., 3] == r_n[..., 3]
    assert same.float().mean() > 0.99  # only fill-rule ties on shared edges may differ
    assert ((r_t[..., 3] > 0) != (r_n[..., 3] > 0)).float().mean() < 0.002  # coverage differs only on ties
    both = same & (r_t[..., 3] > 0)
    torch.testing.assert_close(r_t[both][:, :3], r_n[both][:, :3], rtol=0, atol=2e-4)

    attr = torch.randn(1, verts.shape[0], 5, device=dev)
    i_t, _ = interpolate(attr, r_n, faces, backend="torch")
    i_n, _ = interpolate(attr, r_n, faces, backend="nvdiffrast")
    torch.testing.assert_close(i_t, i_n, rtol=1e-5, atol=1e-5)

    tex = torch.randn(2, 17, 9, 3, device=dev)
    uv = torch.rand(2, 20, 30, 2, device=dev) * 1.6 - 0.3
    for mode in ("wrap", "clamp", "zero"):
        for filt in ("linear", "nearest"):
            torch.testing.assert_close(
                texture(tex, uv, filter_mode=filt, boundary_mode=mode, backend="torch"),
                texture(tex, uv, filter_mode=filt, boundary_mode=mode, backend="nvdiffrast"),
                rtol=1e-4, atol=1e-4,
            )

    # Antialias: different methods, same purpose; the summed-coverage gradient of a moving silhouette edge agrees
    # in sign and roughly in size.
    grads = {}
    for backend in ("torch", "nvdiffrast"):
        xr = torch.tensor([0.37, 0.41], dtype=torch.float64, requires_grad=True)
        p, t = edge_scene(xr)
        p, t = p.float().to(dev), t.to(dev)
        rast, _ = rasterize(p, t, (64, 64), backend=backend)
        mask, _ = interpolate(torch.ones(1, 4, 1, device=dev), rast, t, backend=backend)
        antialias(mask, rast, p, t, backend=backend).sum().backward()
        grads[backend] = xr.grad.sum().item()
    assert grads["torch"] > 0 and grads["nvdiffrast"] > 0
    assert grads["torch"] == pytest.approx(grads["nvdiffrast"], rel=0.3)
