"""Synthetic abdomen CT phantoms with the 13 BTCV organ labels.

Each phantom is a CT-like volume in Hounsfield units (air, subcutaneous fat, muscle wall, lung
bases, bowel loops, a vertebral column with discs and posterior elements) holding 13 organ-like
structures with the BTCV label ids at roughly anatomical positions. The anatomy is laid out in the
world frame of the affine, RAS+ as in nibabel (+x towards the patient's right, +y anterior,
+z superior), and scaled to fill the field of view, so every organ is present at any volume size.
The liver therefore has a larger world x than the spleen, whatever the array orientation.

Per case (all drawn from ``np.random.default_rng(seed)``): global size scale 0.85-1.15, small
shifts of the body and of each organ, per-organ size and HU jitter, noise std 10-20 HU, and a
random pose: a rotation of up to 6 degrees about each axis and random flips of the array axes.
The pose lives in the affine only (the array-to-world mapping is oblique and possibly flipped);
the anatomy is placed in world coordinates, so resampling the volume to RAS gives an upright body.

``write_phantom_dataset`` writes the BTCV layout and names the cases with BTCV ids in this order:
1-10, 21-34 (the standard training ids), then 35-40 (validation ids); case XX is
``make_phantom(seed * 1000 + XX)``. So 24 cases fill the standard training set and 30 cases the
training + validation sets that ``tools.data.btcv_datalist.standard_split`` expects.

Command line::

    python -m tools make_phantoms --output_dir /tmp/phantoms --num_cases 4 --seed 0
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from tools.data.btcv_datalist import TRAINING_IDS, VALIDATION_IDS, image_relpath, label_relpath

logger = logging.getLogger(__name__)

DEFAULT_SHAPE = (112, 112, 72)
DEFAULT_SPACING = (1.2, 1.2, 2.5)
PHANTOM_CASE_IDS = TRAINING_IDS + VALIDATION_IDS
"""BTCV case ids given to phantom cases, in order: 1-10, 21-34 (standard training), then 35-40 (validation)."""

# The anatomy below is written in millimetres for a reference field of view (the default shape
# times the default spacing), centred on the body; it is scaled to the actual field of view.
_REF_FOV = np.array(DEFAULT_SHAPE, float) * np.array(DEFAULT_SPACING, float)
_HU_MIN, _HU_MAX = -1024.0, 3071.0
_MAX_ANGLE_DEG = 6.0


def _rotation(angles_deg) -> np.ndarray:
    """Rotation matrix Rz @ Ry @ Rx for angles (about x, y, z) in degrees."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def random_pose_affine(rng: np.random.Generator, shape, spacing, max_angle_deg: float = _MAX_ANGLE_DEG) -> np.ndarray:
    """Voxel-to-world (RAS, mm) affine with the given spacing, a small random rotation and random axis flips.

    The array centre maps to a random scanner position within 25 mm of the world origin.
    """
    rot = _rotation(rng.uniform(-max_angle_deg, max_angle_deg, 3))
    flips = rng.choice([-1.0, 1.0], size=3)
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(flips * np.asarray(spacing, float))
    centre_index = (np.asarray(shape, float) - 1) / 2
    affine[:3, 3] = rng.uniform(-25, 25, 3) - affine[:3, :3] @ centre_index
    return affine


class _Canvas:
    """Image and label arrays plus the mapping from voxel index to reference-anatomy millimetres."""

    def __init__(self, shape, affine, body_centre, scale):
        self.shape = tuple(int(s) for s in shape)
        self.image = np.full(self.shape, -1000.0, np.float32)
        self.label = np.zeros(self.shape, np.uint8)
        self.lin = affine[:3, :3]
        self.centre_index = (np.asarray(self.shape, float) - 1) / 2
        # world position of the array centre minus body centre, so that
        # reference = (lin @ (ijk - centre_index) + offset) / scale
        self.offset = affine[:3, :3] @ self.centre_index + affine[:3, 3] - body_centre
        self.scale = np.asarray(scale, float)
        self._inv = np.linalg.inv(self.lin)

    def box(self, lo, hi):
        """Voxel slices covering the reference-frame box [lo, hi], or None if it misses the array."""
        lo, hi = np.asarray(lo, float), np.asarray(hi, float)
        corners = np.array(list(itertools.product(*zip(lo, hi))))
        ijk = (self._inv @ (corners * self.scale - self.offset).T).T + self.centre_index
        start = np.maximum(np.floor(ijk.min(0)).astype(int) - 1, 0)
        stop = np.minimum(np.ceil(ijk.max(0)).astype(int) + 2, self.shape)
        if np.any(stop <= start):
            return None
        return tuple(slice(a, b) for a, b in zip(start, stop))

    def coords(self, sl):
        """Reference-frame x, y, z (mm) of the voxels in slices ``sl`` (broadcast to the block)."""
        idx = [np.arange(s.start, s.stop, dtype=np.float32) - np.float32(c) for s, c in zip(sl, self.centre_index)]
        i, j, k = idx[0][:, None, None], idx[1][None, :, None], idx[2][None, None, :]
        lin = self.lin.astype(np.float32)
        out = []
        for a in range(3):
            w = lin[a, 0] * i + lin[a, 1] * j + lin[a, 2] * k + np.float32(self.offset[a])
            out.append(w / np.float32(self.scale[a]))
        return out

    def paint(self, shape_fn, lo, hi, hu, label=None, within=None, clip=None):
        """Set HU (and label, if given) where ``shape_fn(x, y, z)`` is true.

        ``within``: only where the current label equals this id. ``clip``: (a, b) semi-axes of an
        axial ellipse (the abdominal cavity) the structure is cut to.
        """
        sl = self.box(lo, hi)
        if sl is None:
            return 0
        x, y, z = self.coords(sl)
        mask = np.broadcast_to(shape_fn(x, y, z), tuple(s.stop - s.start for s in sl))
        if clip is not None:
            mask = mask & ((x / clip[0]) ** 2 + (y / clip[1]) ** 2 <= 1.0)
        if within is not None:
            mask = mask & (self.label[sl] == within)
        self.image[sl][mask] = hu
        if label is not None:
            self.label[sl][mask] = label
        return int(mask.sum())

    # primitives, all in reference millimetres -------------------------------------------------

    def ellipsoid(self, centre, semi, hu, label=None, angles=(0, 0, 0), **kw):
        """Ellipsoid with semi-axes ``semi`` rotated by ``angles`` (degrees about x, y, z)."""
        c, s, rot = np.asarray(centre, float), np.asarray(semi, float), _rotation(angles)
        half = np.sqrt(((rot * s) ** 2).sum(1))

        def inside(x, y, z):
            d = (x - c[0], y - c[1], z - c[2])
            acc = 0.0
            for a in range(3):
                local = rot[0, a] * d[0] + rot[1, a] * d[1] + rot[2, a] * d[2]
                acc = acc + (local / s[a]) ** 2
            return acc <= 1.0

        return self.paint(inside, c - half, c + half, hu, label, **kw)

    def tube(self, p0, p1, radius, hu, label=None, **kw):
        """Capsule of the given radius around the segment p0-p1."""
        p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
        u = p1 - p0
        uu = float(u @ u)

        def inside(x, y, z):
            d = (x - p0[0], y - p0[1], z - p0[2])
            t = np.clip((d[0] * u[0] + d[1] * u[1] + d[2] * u[2]) / uu, 0.0, 1.0)
            return (d[0] - t * u[0]) ** 2 + (d[1] - t * u[1]) ** 2 + (d[2] - t * u[2]) ** 2 <= radius**2

        return self.paint(inside, np.minimum(p0, p1) - radius, np.maximum(p0, p1) + radius, hu, label, **kw)

    def column(self, c0, c1, semi, z0, z1, hu, label=None, **kw):
        """Elliptic cylinder between heights z0 < z1 whose axial centre moves linearly from c0 to c1."""
        c0, c1, (a, b) = np.asarray(c0, float), np.asarray(c1, float), semi

        def inside(x, y, z):
            t = (z - z0) / (z1 - z0)
            cx, cy = c0[0] + t * (c1[0] - c0[0]), c0[1] + t * (c1[1] - c0[1])
            return (((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0) & (z >= z0) & (z <= z1)

        lo = [min(c0[0], c1[0]) - a, min(c0[1], c1[1]) - b, z0]
        hi = [max(c0[0], c1[0]) + a, max(c0[1], c1[1]) + b, z1]
        return self.paint(inside, lo, hi, hu, label, **kw)


def _draw_anatomy(cv: _Canvas, rng: np.random.Generator) -> None:
    """Paint the phantom; later structures overwrite earlier ones."""
    zl = _REF_FOV[2] / 2 + 5.0  # structures spanning the whole field of view end beyond it

    def jit(p, mm=2.0):  # small per-organ shift
        return np.asarray(p, float) + rng.uniform(-mm, mm, 3)

    def sz(s, lo=0.92, hi=1.08):  # per-organ size jitter
        return np.asarray(s, float) * rng.uniform(lo, hi)

    def hu(v, sd=5.0):  # per-case organ attenuation
        return float(v + rng.normal(0, sd))

    # body wall: skin/subcutaneous fat, muscle, abdominal cavity
    a, b = 56.0 * rng.uniform(0.95, 1.05), 44.0 * rng.uniform(0.95, 1.05)
    fat, muscle = rng.uniform(4, 9), rng.uniform(4, 6)
    cav = (a - fat - muscle, b - fat - muscle)
    cv.column((0, 0), (0, 0), (a, b), -zl, zl, hu(-100))
    cv.column((0, 0), (0, 0), (a - fat, b - fat), -zl, zl, hu(45))
    cv.column((0, 0), (0, 0), cav, -zl, zl, hu(-70, 10))
    # bowel loops low in the abdomen, some holding gas
    for _ in range(8):
        c = [rng.uniform(-32, 32), rng.uniform(-4, 22), rng.uniform(-85, -20)]
        s = rng.uniform(6, 12, 3)
        cv.ellipsoid(c, s, hu(25), clip=cav)
        if rng.random() < 0.5:
            cv.ellipsoid(c, s * 0.45, -900.0, clip=cav)
    # lung bases (posterior costophrenic recesses) at the top
    for side in (1, -1):
        cv.ellipsoid((side * 30, -12, 102), (21, 22, 32), hu(-850, 20), clip=cav)
    # paraspinal muscles
    for side in (1, -1):
        cv.column((side * 13, -30), (side * 13, -30), (9, 7), -zl, zl, hu(50))

    # organs (BTCV ids): liver 6, stomach 7, spleen 1, kidneys 2/3, pancreas 11, gallbladder 4,
    # aorta 8, IVC 9, portal/splenic veins 10, esophagus 5, adrenals 12/13
    liver = hu(60)
    cv.ellipsoid(jit((26, 5, 30)), sz((28, 30, 42)), liver, 6, angles=(0, 0, rng.uniform(-10, 10)), clip=cav)
    cv.ellipsoid(jit((2, 18, 44)), sz((20, 12, 22)), liver, 6, angles=(0, 0, -15), clip=cav)
    stomach = hu(30)
    fundus = jit((-17, 15, 36))
    cv.ellipsoid(fundus, sz((14, 11, 24)), stomach, 7, angles=(0, -25, 0), clip=cav)
    cv.ellipsoid(jit((0, 22, 16)), sz((14, 7, 8)), stomach, 7, angles=(0, 0, -15), clip=cav)
    cv.ellipsoid(fundus + (-1, 6, 13), sz((8, 5, 8)), -900.0, within=7)  # gas in the fundus
    cv.ellipsoid(jit((-30, -6, 36)), sz((10, 17, 24)), hu(50), 1, angles=(0, 0, 30), clip=cav)
    for lab, side, z in ((2, 1, -12), (3, -1, -4)):  # right kidney sits a little lower
        c = jit((side * 27, -14, z))
        ang = (0, side * rng.uniform(8, 15), side * rng.uniform(-25, -15))
        cv.ellipsoid(c, sz((9, 8, 20)), hu(150, 8), lab, angles=ang, clip=cav)
        cv.ellipsoid(c + (-side * 2, 1, 0), (4.5, 4, 11), hu(115), lab, angles=ang, within=lab)  # medulla/sinus
    pancreas = hu(45)
    cv.ellipsoid(jit((12, 9, 4)), sz((7, 6, 9)), pancreas, 11, clip=cav)
    cv.ellipsoid(jit((-6, 13, 11)), sz((11, 5.5, 6)), pancreas, 11, angles=(0, 0, 10), clip=cav)
    cv.ellipsoid(jit((-22, 8, 18)), sz((10, 5, 6)), pancreas, 11, angles=(0, 0, -30), clip=cav)
    cv.ellipsoid(jit((18, 16, 2)), sz((7, 7, 13)), hu(10), 4, angles=(rng.uniform(-20, 0), 0, 0), clip=cav)
    blood = hu(180, 10)
    dx = rng.uniform(-1.5, 1.5, 2)
    cv.column((-6 + dx[0], -1), (-6 + dx[1], -3), sz((6, 6), 0.9, 1.1), -zl, zl, blood, 8)
    cv.column((11 + dx[0], -1), (11 + dx[1], 0), sz((6.5, 5), 0.9, 1.1), -zl, 72.0, blood - 5, 9)
    conf = jit((0, 9, 10), 1.5)  # splenic-portal confluence behind the pancreatic neck
    cv.tube(jit((-26, 4, 20), 1.5), conf, 3.5 * rng.uniform(0.9, 1.1), blood, 10)
    cv.tube(conf, jit((14, 12, 26), 1.5), 4.5 * rng.uniform(0.9, 1.1), blood, 10)
    cv.tube(jit((-2, 9, zl), 1.0), jit((-11, 14, 52), 1.5), 5.0 * rng.uniform(0.9, 1.1), hu(40), 5)
    for lab, side, z in ((12, 1, 16), (13, -1, 20)):
        ang = (rng.uniform(-10, 10), side * 10, side * rng.uniform(10, 25))
        cv.ellipsoid(jit((side * 15, -10, z), 1.5), sz((5.5, 7, 13)), hu(30), lab, angles=ang)

    # vertebral column, painted last: bodies (cortex + cancellous bone) with discs, arch, canal
    cortex, cancellous = hu(700, 30), hu(300, 20)
    cv.column((0, -17), (0, -17), (8, 8), -zl, zl, cortex, 0)
    cv.column((0, -17), (0, -17), (6.5, 6.5), -zl, zl, cancellous, 0)
    period, phase = rng.uniform(24, 30), rng.uniform(0, 30)
    for z0 in np.arange(-zl - phase, zl, period):
        cv.column((0, -17), (0, -17), (7.5, 7.5), z0, z0 + 5, hu(90), 0)  # disc
        cv.ellipsoid((0, -40, z0 + period / 2 + 2), (2.5, 5, period * 0.3), cortex, 0)  # spinous process
    cv.column((0, -32), (0, -32), (9, 6), -zl, zl, hu(500, 20), 0)
    cv.column((0, -30), (0, -30), (4.5, 4.5), -zl, zl, hu(15), 0)


def make_phantom(seed: int, shape=DEFAULT_SHAPE, spacing=DEFAULT_SPACING):
    """One synthetic abdomen CT: (image float32 HU, label uint8 with ids 0-13, affine 4x4 float64).

    Deterministic by ``seed`` (``np.random.default_rng(seed)``). The anatomy is scaled to fill the
    field of view ``shape * spacing``; the affine carries a random small rotation and axis flips.
    """
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or len(spacing) != 3 or min(shape) < 1 or min(spacing) <= 0:
        raise ValueError(f"need 3 positive sizes and spacings, got shape={shape} spacing={spacing}")
    rng = np.random.default_rng(seed)
    affine = random_pose_affine(rng, shape, spacing)
    fov = np.asarray(shape) * np.asarray(spacing)
    size = rng.uniform(0.85, 1.15)
    scale = size * np.array([min(fov[:2] / _REF_FOV[:2])] * 2 + [fov[2] / _REF_FOV[2]])
    body_centre = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2) + affine[:3, 3]
    body_centre = body_centre + rng.uniform(-4, 4, 3) * scale
    cv = _Canvas(shape, affine, body_centre, scale)
    _draw_anatomy(cv, rng)
    sigma_mm = 0.7  # partial-volume blur, then scanner noise
    image = gaussian_filter(cv.image, sigma=[sigma_mm / s for s in spacing], mode="nearest")
    image += rng.normal(0.0, rng.uniform(10, 20), shape).astype(np.float32)
    np.clip(image, _HU_MIN, _HU_MAX, out=image)
    return image.astype(np.float32, copy=False), cv.label, affine


def windowed_crops(n: int, roi_size, hu_window, seed: int, spacing=(1.5, 1.5, 2.0)) -> tuple[np.ndarray, np.ndarray]:
    """``n`` phantoms of ``roi_size`` (seeds ``seed`` to ``seed + n - 1``) as training crops.

    Returns (images, labels), each (n, 1, *roi_size) float32: images windowed from ``hu_window`` to
    0..1 as the bundles' preprocessing does, labels the organ ids 0-13.
    """
    lo, hi = (float(v) for v in hu_window)
    images, labels = [], []
    for i in range(int(n)):
        image, label, _ = make_phantom(seed + i, shape=tuple(roi_size), spacing=spacing)
        images.append(np.clip((image - lo) / (hi - lo), 0.0, 1.0)[None])
        labels.append(label[None].astype(np.float32))
    return np.stack(images).astype(np.float32), np.stack(labels)


def _nifti(array: np.ndarray, affine: np.ndarray):
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.header.set_data_dtype(array.dtype)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return img


def write_phantom_dataset(
    output_dir,
    num_cases: int = 4,
    seed: int = 0,
    layout: str = "btcv",
    shape=DEFAULT_SHAPE,
    spacing=DEFAULT_SPACING,
    image_dtype: str = "int16",
):
    """Write phantoms as NIfTI in the BTCV layout; return the list of (image path, label path).

    Files: ``RawData/Training/img/img00XX.nii.gz`` (HU, int16 or float32) and
    ``RawData/Training/label/label00XX.nii.gz`` (uint8), same affine as qform and sform.
    Case ids are taken in order from ``PHANTOM_CASE_IDS`` (1-10, 21-34, then 35-40), so 24 cases
    fill the standard training set and 30 the standard training + validation sets.
    Case ``XX`` is ``make_phantom(seed * 1000 + XX, shape, spacing)``.
    """
    import nibabel as nib

    if layout != "btcv":
        raise ValueError(f"unknown layout {layout!r}; only 'btcv' (RawData/Training/img, label) is supported")
    num_cases = int(num_cases)
    if not 1 <= num_cases <= len(PHANTOM_CASE_IDS):
        raise ValueError(f"num_cases must be in 1..{len(PHANTOM_CASE_IDS)} (BTCV training + validation ids)")
    if image_dtype not in ("int16", "float32"):
        raise ValueError(f"image_dtype must be 'int16' or 'float32', got {image_dtype!r}")
    raw = Path(output_dir) / "RawData"
    written = []
    for cid in PHANTOM_CASE_IDS[:num_cases]:
        image, label, affine = make_phantom(int(seed) * 1000 + cid, shape=shape, spacing=spacing)
        if image_dtype == "int16":
            image = np.rint(image).astype(np.int16)
        img_path, lab_path = raw / image_relpath(cid), raw / label_relpath(cid)
        img_path.parent.mkdir(parents=True, exist_ok=True)
        lab_path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(_nifti(image, affine), img_path)
        nib.save(_nifti(label, affine), lab_path)
        written.append((str(img_path), str(lab_path)))
    logger.info("wrote %d phantom case(s) under %s", len(written), raw)
    return written


def main(
    output_dir: str,
    num_cases: int = 4,
    seed: int = 0,
    shape=DEFAULT_SHAPE,
    spacing=DEFAULT_SPACING,
    image_dtype: str = "int16",
) -> None:
    """Command line: write the phantom data set and print a one-line summary."""
    written = write_phantom_dataset(
        output_dir, num_cases=num_cases, seed=seed, shape=shape, spacing=spacing, image_dtype=image_dtype
    )
    print(
        f"{output_dir}: {len(written)} phantom case(s), shape {tuple(shape)}, spacing {tuple(spacing)} mm, "
        f"BTCV layout RawData/Training/{{img,label}}"
    )


if __name__ == "__main__":
    from tools.common.cli import fire_command

    fire_command(main)
