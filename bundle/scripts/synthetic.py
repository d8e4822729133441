"""Embedded default data: deterministic synthetic short-axis cardiac cine-MRI-like volumes.

Each volume is a stack of 2D short-axis slices ordered base -> apex (array layout (H, W, Z)) with ACDC labels
0 background, 1 right ventricle (RV), 2 myocardium (Myo), 3 left ventricle (LV) blood pool.

Anatomy as a function of the relative depth ``t = k / (Z - 1)`` (0 = base, 1 = apex), shared by all volumes so that
slices at the same relative depth look alike (the "partition" cue of the method):

* LV: a slightly elliptical bright disc inside a dark myocardium ring. The outer radius stays nearly constant over the
  basal half and shrinks towards the apex; the wall thickens; the cavity closes in the last slice(s) (apex cap).
* RV: a bright crescent wrapped against one side of the myocardium (the septum), large and wide at the base, thinner
  and narrower towards the apex, absent after a per-volume vanishing depth (always before the last slice).
* Base: sometimes an open myocardium ring (outflow tract, labelled LV) and an unlabelled bright atrium beside the heart.
* Mid slices: papillary muscles (myocardium-dark, labelled LV) inside the cavity.
* Background: body outline with a bright subcutaneous fat layer, chest-wall muscle, dark lungs with bright vessels,
  spine, a bright descending aorta, patchy bright pericardial fat, and liver / stomach appearing towards the apex.
  Short-axis planes are oblique to the body's long axis, so from base to apex the whole chest slides across the field
  of view behind the heart (by 0.3-0.6 mm per mm of depth, in a per-volume direction near the spine's) while the
  lungs recede as the diaphragm rises. Without this, the slices of one volume were near-copies of each other (pixel
  correlation 0.74, against 0.28 on ACDC), and the G^D loss, which takes them as negatives, could not learn.

Per volume: size, spacing, number of slices, heart position / scale / rotation, tissue contrasts, partial-volume blur,
a smooth multiplicative bias field and Rician noise vary; per slice: slight misalignment (breath-hold).
As in ACDC, each patient belongs to one of five groups (normal, previous infarction, dilated or hypertrophic
cardiomyopathy, abnormal right ventricle) that change the heart's size, wall thickness and RV; and, as across
scanners and sequences, each volume has its own non-linear intensity response (a gamma curve). One labelled volume
therefore shows one group and one appearance only, while the unlabelled volumes show them all.
"""

from __future__ import annotations

import logging
import math
import os
import uuid
from dataclasses import dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

__all__ = ["make_volume", "write_dataset", "patient_seed", "patient_group"]

# ---- stack geometry -------------------------------------------------------------------------------------------------
NUM_SLICES_RANGE = (8, 14)  # inclusive
IN_PLANE_SIZES = tuple(range(160, 209, 8))  # H and W drawn independently
IN_PLANE_SPACING_RANGE = (1.3, 1.8)  # mm, isotropic in-plane
SLICE_SPACING = 10.0  # mm

# ---- heart anatomy (mm at scale 1; t = relative depth, 0 = base, 1 = apex) -------------------------------------------
HEART_SCALE_RANGE = (0.85, 1.12)
# patient groups as in ACDC: probability, LV scale, wall thickness and RV thickness multipliers
PATHOLOGIES = {
    "normal": (0.2, 1.0, 1.0, 1.0),
    "infarction": (0.2, 1.1, 0.8, 1.0),  # MINF: thinned wall, mildly dilated
    "dilated": (0.2, 1.22, 0.7, 1.0),  # DCM: large LV, thin wall
    "hypertrophic": (0.2, 0.92, 1.6, 0.9),  # HCM: thick wall, small cavity
    "abnormal_rv": (0.2, 0.95, 1.0, 1.6),  # ARV: enlarged RV
}
LV_OUTER_RADIUS_BASE = 27.0  # outer (epicardial) diameter ~ 46-60 mm at the base
LV_APEX_SHRINK_RANGE = (0.5, 0.65)  # outer radius at the apex = (1 - shrink) * base radius
LV_SHRINK_EXPONENT_RANGE = (2.2, 3.5)  # the radius falls off as t ** exponent (cylindrical base, tapering apex)
LV_ECCENTRICITY_RANGE = (0.92, 1.08)  # axis ratio of the elliptical LV
MYO_THICKNESS_BASE_RANGE = (6.0, 8.5)
MYO_THICKENING_RANGE = (0.2, 0.45)  # relative wall thickening base -> apex
MIN_CAVITY_RADIUS = 2.5  # below this the cavity closes (apex cap)
MIN_WALL = 3.0  # the myocardium is never thinner than this, so the LV never touches the background
CONTOUR_WOBBLE = 0.035  # amplitude of the low-frequency contour perturbation (relative)
RV_THICKNESS_BASE_RANGE = (14.0, 22.0)  # radial thickness of the RV crescent at the base
RV_VANISH_DEPTH_RANGE = (0.72, 0.93)  # t after which the RV is absent
RV_WRAP_BASE_RANGE = (math.radians(75.0), math.radians(100.0))  # half-angle the RV wraps round the LV, at the base
RV_WRAP_APEX = math.radians(45.0)
RV_SKEW_MAX = math.radians(15.0)  # the crescent's thickest point is off the RV axis by up to this
RV_TIP_EXPONENT = 0.6  # thickness profile (1 - (angle / wrap) ** 2) ** exponent: tapering tips
RV_FREE_WALL_RANGE = (1.8, 3.0)  # thin dark RV free wall (labelled background)
PAPILLARY_DEPTH = (0.15, 0.75)
PAPILLARY_RADIUS_RANGE = (2.0, 3.5)
HEART_SHIFT_MAX = 16.0  # random translation of the basal LV centre (mm)
HEART_OFFSET_FROM_RV = 10.0  # the LV centre sits this far from the image centre, away from the RV
HEART_TILT_MAX = 8.0  # drift of the LV centre from base to apex (oblique long axis), mm
SLICE_SHIFT_SIGMA_RANGE = (0.4, 1.8)  # per-slice misalignment (mm), clipped to SLICE_SHIFT_MAX
SLICE_SHIFT_MAX = 3.5
CHEST_ROTATION_MAX = math.radians(40.0)
RV_ANGLE_JITTER = math.radians(15.0)
RV_CANONICAL_DIRECTION = (-0.35, -0.94)  # (rows, cols): towards the upper left in a standard display
MAX_HEART_EXTENT = 85.0  # the whole heart (labels) stays within this distance of the image centre (mm)

# ---- background anatomy (mm) ----------------------------------------------------------------------------------------
BODY_HALF_AXES_RANGE = ((105.0, 125.0), (140.0, 175.0))  # antero-posterior, left-right
BODY_CENTRE_FROM_HEART = (45.0, 25.0)
FAT_LAYER_RANGE = (4.0, 14.0)
MUSCLE_LAYER_RANGE = (6.0, 14.0)
AORTA_RADIUS_RANGE = (9.0, 13.0)
SPINE_RADIUS_RANGE = (13.0, 18.0)
LIVER_ONSET_RANGE = (0.25, 0.6)  # t at which the liver (dome) appears
LUNG_RECESSION_RANGE = (0.4, 0.7)  # the lungs' half-axes shrink by this fraction from base (t = 0) to apex (t = 1)
# short-axis planes are oblique to the body's axis, so from base to apex the chest slides across the field of view
# behind the heart: in-plane shift of the background per mm along the heart's axis, and the direction of that shift
# in the chest frame (u, v: +u posterior, towards the spine) with its per-volume jitter
BACKGROUND_DRIFT_RANGE = (0.3, 0.6)
BACKGROUND_DRIFT_DIRECTION = 0.0  # radians in the chest frame: towards the spine
BACKGROUND_DRIFT_JITTER = math.radians(25.0)
NUM_LUNG_VESSELS = 14
NUM_EXTRA_BLOBS_RANGE = (3, 6)  # other mediastinal / abdominal structures (vessels, fat pads, bowel)
BLOB_DISTANCE_RANGE = (35.0, 95.0)  # from the basal LV centre
BLOB_HALF_AXES_RANGE = (6.0, 22.0)

# ---- image formation (intensities before bias, noise and min-max scaling; blood ~ 0.65-1.0) -------------------------
TISSUE_INTENSITY_RANGES = {  # absolute
    "blood": (0.65, 1.0),
    "myo": (0.14, 0.32),
    "fat": (0.55, 1.0),
    "lung": (0.01, 0.07),
    "stomach": (0.1, 0.7),
}
TISSUE_RATIO_TO_MYO_RANGES = {  # soft tissues resemble the myocardium (bSSFP), so it cannot be thresholded out
    "muscle": (0.85, 1.25),
    "liver": (0.9, 1.5),
    "body": (0.95, 1.7),
    "spine": (1.0, 1.9),
}
RV_BLOOD_RATIO_RANGE = (0.8, 1.02)
TEXTURE_AMPLITUDE_RANGE = (0.03, 0.1)
BLUR_SIGMA_RANGE = (0.4, 0.9)  # partial-volume blur (pixels)
BIAS_STRENGTH = 0.3  # std of the log-bias polynomial coefficients
GAMMA_RANGE = (0.5, 2.0)  # per-volume intensity response image ** gamma (log-uniform): scanner / sequence
NOISE_SIGMA_RANGE = (0.015, 0.06)  # Rician noise std (same units as the tissue intensities)

_OPTIONS = ("num_slices", "shape", "in_plane_spacing", "slice_spacing", "noise_level")


@dataclass
class _Params:
    """Per-volume random parameters (lengths in mm, angles in radians)."""

    shape: tuple[int, int]
    num_slices: int
    spacing: tuple[float, float, float]
    scale: float
    lv_shrink: float
    lv_exponent: float
    lv_ecc: float
    myo_base: float
    myo_thickening: float
    apex_cap: bool
    outer_wobble: np.ndarray  # (2, 3): amplitudes and phases of harmonics 2..4
    cavity_wobble: np.ndarray
    rv_base: float
    rv_vanish: float
    rv_wrap_base: float
    rv_skew: float
    rv_wobble: np.ndarray
    rv_free_wall: float
    open_base: bool
    open_angle: float
    open_halfwidth: float
    atrium: bool
    atrium_angle: float
    atrium_radius: float
    papillary_angles: tuple[float, float]
    papillary_radius: float
    chest_angle: float
    rv_angle: float  # in the chest frame
    anchor: np.ndarray  # basal LV centre in image coordinates (mm from the image centre)
    tilt: np.ndarray  # LV centre drift at the apex (chest frame)
    slice_shifts: np.ndarray  # (Z, 2) whole-slice misalignment
    heart_jitter: np.ndarray  # (Z, 2)
    body_axes: tuple[float, float]
    body_centre: np.ndarray
    fat_layer: float
    muscle_layer: float
    aorta_radius: float
    spine_radius: float
    liver_onset: float
    lung_recession: float  # fraction by which the lungs' half-axes shrink from base to apex
    background_drift: np.ndarray  # (2,): in-plane shift of the chest (u, v) per mm along the heart's axis
    stomach: bool
    organ_wobble: np.ndarray  # (4, 2, 3): outlines of the two lungs, the liver and the stomach
    blobs: list  # [(cu, cv, au, av, t_from, t_to, intensity, wobble)]
    intensity: dict
    blood_gradient: float
    texture: float
    blur: float
    bias: np.ndarray  # (6,) log-bias coefficients
    noise: float
    pathology: str  # a key of PATHOLOGIES (already applied to scale, myo_base and rv_base)
    gamma: float


def _rotate(u, v, angle: float):
    """Coordinates of (u, v) in a frame whose first axis points at ``angle``."""
    c, s = math.cos(angle), math.sin(angle)
    return c * u + s * v, -s * u + c * v


def _ellipse(u, v, cu: float, cv: float, au: float, av: float) -> np.ndarray:
    return ((u - cu) / au) ** 2 + ((v - cv) / av) ** 2 <= 1.0


def _blob(u, v, cu: float, cv: float, au: float, av: float, wobble: np.ndarray) -> np.ndarray:
    """An ellipse whose boundary is perturbed by low-frequency harmonics (organic outline)."""
    du, dv = (u - cu) / au, (v - cv) / av
    rho = np.hypot(du, dv)
    amp = float(np.abs(wobble[0]).sum())
    inside = rho <= 1.0 - amp
    edge = (rho > 1.0 - amp) & (rho <= 1.0 + amp)  # only the boundary band needs the angular perturbation
    inside[edge] = rho[edge] <= _wobble(np.arctan2(dv[edge], du[edge]), wobble)
    return inside


def _wobble(theta: np.ndarray, coeffs: np.ndarray) -> np.ndarray:
    """Relative radial perturbation 1 + sum_k a_k cos(k theta + phi_k), k = 2..4."""
    out = np.ones_like(theta)
    for i, k in enumerate((2, 3, 4)):
        out += coeffs[0, i] * np.cos(k * theta + coeffs[1, i])
    return out


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_px, mode="wrap")
    return field / (field.std() + 1e-6)


# ---- heart shape as a function of the relative depth t ---------------------------------------------------------------
def lv_outer_radius(t: float, p: _Params) -> float:
    """Epicardial radius (mm): nearly constant at the base, tapering towards the apex."""
    return p.scale * LV_OUTER_RADIUS_BASE * (1.0 - p.lv_shrink * t**p.lv_exponent)


def myo_thickness(t: float, p: _Params) -> float:
    """Myocardial wall thickness (mm): relatively thicker towards the apex."""
    return p.scale * p.myo_base * (1.0 + p.myo_thickening * t)


def lv_cavity_radius(t: float, p: _Params, last_slice: bool) -> float:
    """LV blood-pool radius (mm); 0 once the cavity closes (apex cap)."""
    r = lv_outer_radius(t, p) - myo_thickness(t, p)
    if r < MIN_CAVITY_RADIUS * p.scale or (last_slice and p.apex_cap):
        return 0.0
    return r


def rv_thickness(t: float, p: _Params) -> float:
    """Radial thickness of the RV crescent (mm); 0 after the per-volume vanishing depth."""
    if t >= p.rv_vanish:
        return 0.0
    return p.rv_base * (1.0 - t / p.rv_vanish) ** 0.75


def rv_wrap(t: float, p: _Params) -> float:
    """Half-angle (radians) over which the RV crescent wraps round the LV: wide at the base, narrow at the apex."""
    return p.rv_wrap_base + (RV_WRAP_APEX - p.rv_wrap_base) * t


def _crescent(theta: np.ndarray, thickness: float, wrap: float, skew: float) -> np.ndarray:
    """Radial thickness (mm) of a crescent centred on angle ``skew``, tapering to 0 at +-``wrap`` from it."""
    d = np.angle(np.exp(1j * (theta - skew)))  # wrapped angular distance in (-pi, pi]
    return thickness * np.clip(1.0 - (d / wrap) ** 2, 0.0, None) ** RV_TIP_EXPONENT


# ---- parameters ------------------------------------------------------------------------------------------------------
def _check_options(options: dict) -> None:
    unknown = set(options) - set(_OPTIONS)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)}; allowed: {list(_OPTIONS)}")
    z = options.get("num_slices")
    if z is not None and (not isinstance(z, (int, np.integer)) or isinstance(z, bool) or z < 2):
        raise ValueError(f"num_slices must be an int >= 2, got {z!r}")
    shape = options.get("shape")
    if shape is not None:
        if len(shape) != 2 or any(int(s) != s or s < 64 for s in shape):
            raise ValueError(f"shape must be two ints >= 64 (H, W), got {shape!r}")
    for key in ("in_plane_spacing", "slice_spacing"):
        val = options.get(key)
        if val is not None and not (float(val) > 0 and math.isfinite(float(val))):
            raise ValueError(f"{key} must be a positive finite number (mm), got {val!r}")
    noise = options.get("noise_level")
    if noise is not None and not (float(noise) >= 0 and math.isfinite(float(noise))):
        raise ValueError(f"noise_level must be a finite number >= 0, got {noise!r}")


def _draw_params(rng: np.random.Generator, options: dict) -> _Params:
    """Draw every per-volume parameter (always the same draws, in the same order), applying the caller's overrides.

    The per-slice draws come last, so overriding num_slices leaves every other per-volume parameter unchanged.
    """
    def uni(lo_hi):
        return float(rng.uniform(*lo_hi))

    def wobble(amplitude=CONTOUR_WOBBLE):
        return np.stack([rng.uniform(0, amplitude, 3) / np.array([1.0, 1.5, 2.0]), rng.uniform(0, 2 * math.pi, 3)])

    # stack geometry
    shape = (int(rng.choice(IN_PLANE_SIZES)), int(rng.choice(IN_PLANE_SIZES)))
    num_slices = int(rng.integers(NUM_SLICES_RANGE[0], NUM_SLICES_RANGE[1] + 1))
    sxy = uni(IN_PLANE_SPACING_RANGE)
    noise = uni(NOISE_SIGMA_RANGE)
    shape = tuple(int(s) for s in options.get("shape") or shape)
    num_slices = int(options.get("num_slices") or num_slices)
    sxy = float(options.get("in_plane_spacing") or sxy)
    sz = float(options.get("slice_spacing") or SLICE_SPACING)
    noise = float(options["noise_level"]) if options.get("noise_level") is not None else noise
    d = dict(shape=shape, num_slices=num_slices, spacing=(sxy, sxy, sz), noise=noise)

    # heart placement: chest rotation, RV direction, translation, oblique long axis
    d["chest_angle"] = uni((-CHEST_ROTATION_MAX, CHEST_ROTATION_MAX))
    rv_canonical = math.atan2(RV_CANONICAL_DIRECTION[1], RV_CANONICAL_DIRECTION[0])
    d["rv_angle"] = rv_canonical + uni((-RV_ANGLE_JITTER, RV_ANGLE_JITTER))
    rv_img = d["rv_angle"] + d["chest_angle"]
    shift = rng.uniform(-1, 1, 2)
    shift *= HEART_SHIFT_MAX * math.sqrt(rng.uniform()) / max(np.linalg.norm(shift), 1e-6)
    d["anchor"] = shift - HEART_OFFSET_FROM_RV * np.array([math.cos(rv_img), math.sin(rv_img)])
    tilt_angle = rng.uniform(0, 2 * math.pi)
    d["tilt"] = HEART_TILT_MAX * rng.uniform() * np.array([math.cos(tilt_angle), math.sin(tilt_angle)])

    # heart shape
    d.update(
        scale=uni(HEART_SCALE_RANGE),
        lv_shrink=uni(LV_APEX_SHRINK_RANGE),
        lv_exponent=uni(LV_SHRINK_EXPONENT_RANGE),
        lv_ecc=uni(LV_ECCENTRICITY_RANGE),
        myo_base=uni(MYO_THICKNESS_BASE_RANGE),
        myo_thickening=uni(MYO_THICKENING_RANGE),
        apex_cap=bool(rng.uniform() < 0.6),
        outer_wobble=wobble(),
        cavity_wobble=wobble(),
        rv_base=uni(RV_THICKNESS_BASE_RANGE),
        rv_vanish=uni(RV_VANISH_DEPTH_RANGE),
        rv_wrap_base=uni(RV_WRAP_BASE_RANGE),
        rv_skew=uni((-RV_SKEW_MAX, RV_SKEW_MAX)),
        rv_wobble=wobble(),
        rv_free_wall=uni(RV_FREE_WALL_RANGE),
    )
    # base features (outflow tract, atrium) and papillary muscles
    d.update(
        open_base=bool(rng.uniform() < 0.5),
        open_angle=uni((0.35 * math.pi, 0.65 * math.pi)) * (1 if rng.uniform() < 0.5 else -1),
        open_halfwidth=uni((0.2 * math.pi, 0.3 * math.pi)),
        atrium=bool(rng.uniform() < 0.7),
        atrium_angle=math.pi + uni((-0.4, 0.4)),
        atrium_radius=uni((11.0, 17.0)),
        papillary_angles=(math.pi + uni((0.5, 1.0)), math.pi - uni((0.5, 1.0))),
        papillary_radius=uni(PAPILLARY_RADIUS_RANGE),
    )
    # contrast
    intensity = {name: uni(lo_hi) for name, lo_hi in TISSUE_INTENSITY_RANGES.items()}
    intensity.update({name: intensity["myo"] * uni(r) for name, r in TISSUE_RATIO_TO_MYO_RANGES.items()})
    intensity["rv_blood"] = intensity["blood"] * uni(RV_BLOOD_RATIO_RANGE)
    d.update(
        intensity=intensity,
        blood_gradient=uni((-0.12, 0.12)),
        texture=uni(TEXTURE_AMPLITUDE_RANGE),
        blur=uni(BLUR_SIGMA_RANGE),
        bias=rng.normal(0, BIAS_STRENGTH, 6),
    )
    # background anatomy
    d.update(
        body_axes=(uni(BODY_HALF_AXES_RANGE[0]), uni(BODY_HALF_AXES_RANGE[1])),
        body_centre=np.array(BODY_CENTRE_FROM_HEART) + rng.normal(0, 8.0, 2),
        fat_layer=uni(FAT_LAYER_RANGE),
        muscle_layer=uni(MUSCLE_LAYER_RANGE),
        aorta_radius=uni(AORTA_RADIUS_RANGE),
        spine_radius=uni(SPINE_RADIUS_RANGE),
        liver_onset=uni(LIVER_ONSET_RANGE),
        stomach=bool(rng.uniform() < 0.6),
        organ_wobble=np.stack([wobble(0.15) for _ in range(4)]),
    )
    # patient group (scales the heart drawn above) and intensity response; drawn after the anatomy above
    names = list(PATHOLOGIES)
    d["pathology"] = names[int(rng.choice(len(names), p=[PATHOLOGIES[n][0] for n in names]))]
    _, lv_scale, wall_scale, rv_scale = PATHOLOGIES[d["pathology"]]
    d["scale"] *= lv_scale
    d["myo_base"] *= wall_scale / lv_scale  # wall thickness = scale * myo_base
    d["rv_base"] *= rv_scale
    d["gamma"] = float(np.exp(rng.uniform(*np.log(GAMMA_RANGE))))
    blobs = []
    for _ in range(int(rng.integers(NUM_EXTRA_BLOBS_RANGE[0], NUM_EXTRA_BLOBS_RANGE[1] + 1))):
        dist, ang = uni(BLOB_DISTANCE_RANGE), rng.uniform(0, 2 * math.pi)
        t_from = rng.uniform(-0.5, 0.7)
        kind = str(rng.choice(["blood", "fat", "muscle", "body", "stomach"]))
        centre = (dist * math.cos(ang), dist * math.sin(ang))
        half_axes = (uni(BLOB_HALF_AXES_RANGE), uni(BLOB_HALF_AXES_RANGE))
        t_to = t_from + rng.uniform(0.3, 1.0)
        value = intensity[kind] * rng.uniform(0.85, 1.1)
        blobs.append((*centre, *half_axes, t_from, t_to, value, wobble(0.25)))
    d["blobs"] = blobs

    # drawn after everything above, so that adding it left every earlier draw unchanged
    d["lung_recession"] = uni(LUNG_RECESSION_RANGE)
    drift_angle = BACKGROUND_DRIFT_DIRECTION + uni((-BACKGROUND_DRIFT_JITTER, BACKGROUND_DRIFT_JITTER))
    d["background_drift"] = uni(BACKGROUND_DRIFT_RANGE) * np.array([math.cos(drift_angle), math.sin(drift_angle)])

    # per slice (drawn last): breath-hold misalignment of the whole slice, and of the heart alone
    shift_sigma = uni(SLICE_SHIFT_SIGMA_RANGE)
    d["slice_shifts"] = np.clip(rng.normal(0, shift_sigma, (num_slices, 2)), -SLICE_SHIFT_MAX, SLICE_SHIFT_MAX)
    d["heart_jitter"] = np.clip(rng.normal(0, 0.6, (num_slices, 2)), -1.5, 1.5)
    return _Params(**d)


# ---- rendering -------------------------------------------------------------------------------------------------------
def _paint_background(img: np.ndarray, u: np.ndarray, v: np.ndarray, t: float, p: _Params, rng) -> None:
    """Body, fat, muscle, lungs (+ vessels), spine, aorta, liver and stomach, in the chest frame (u, v)."""
    ti = p.intensity
    bu, bv = p.body_centre
    au, av = p.body_axes
    img[_ellipse(u, v, bu, bv, au, av)] = ti["fat"]
    f = p.fat_layer
    img[_ellipse(u, v, bu, bv, au - f, av - f)] = ti["muscle"]
    m = f + p.muscle_layer
    inner = _ellipse(u, v, bu, bv, au - m, av - m)
    img[inner] = ti["body"]
    ow = p.organ_wobble
    ls = 1.0 - p.lung_recession * t  # the lungs recede towards the apex as the diaphragm rises
    lungs = _blob(u, v, bu - 0.15 * au, bv + 0.5 * av, 0.55 * au * ls, 0.32 * av * ls, ow[0])
    lungs |= _blob(u, v, bu - 0.1 * au, bv - 0.55 * av, 0.5 * au * ls, 0.3 * av * ls, ow[1])
    lungs &= inner
    img[lungs] = ti["lung"]
    # a few bright vessels inside the lungs (positions drawn per slice)
    idx = np.flatnonzero(lungs)
    if idx.size:
        pick = rng.choice(idx, size=min(NUM_LUNG_VESSELS, idx.size), replace=False)
        vu, vv = u.ravel()[pick], v.ravel()[pick]
        radii = rng.uniform(1.2, 3.0, pick.size)
        d2 = (u[..., None] - vu) ** 2 + (v[..., None] - vv) ** 2
        img[(d2 <= radii**2).any(-1) & lungs] = ti["blood"] * 0.8
    su, sv = bu + au - m - p.spine_radius - 8.0, bv + 0.05 * av
    img[_ellipse(u, v, su, sv, p.spine_radius + 2.5, p.spine_radius + 2.5)] = ti["muscle"] * 0.6
    img[_ellipse(u, v, su, sv, p.spine_radius, p.spine_radius)] = ti["spine"]
    img[_ellipse(u, v, su - p.spine_radius - p.aorta_radius, sv + 12.0, p.aorta_radius, p.aorta_radius)] = ti["blood"]
    grow = np.clip((t - p.liver_onset) / (1.0 - p.liver_onset), 0.0, 1.0) ** 0.7
    if grow > 0.05:
        liver = _blob(u, v, bu + 0.35 * au, bv - 0.3 * av, 0.55 * au * grow, 0.5 * av * grow, ow[2]) & inner
        img[liver] = ti["liver"]
    if p.stomach and t > 0.55:
        g = (t - 0.55) / 0.45
        img[_blob(u, v, bu + 0.3 * au, bv + 0.3 * av, 12 + 25 * g, 15 + 30 * g, ow[3]) & inner] = ti["stomach"]
    for cu, cv, bu_, bv_, t_from, t_to, value, wob in p.blobs:
        if t_from <= t <= t_to:
            img[_blob(u, v, cu, cv, bu_, bv_, wob) & inner] = value


def _render_heart(img: np.ndarray, label: np.ndarray, u, v, t: float, k: int, p: _Params, rng) -> None:
    """Pericardial fat, atrium, RV (+ free wall), myocardium, LV and papillary muscles, painted over the background.

    ``img`` and ``label`` are C-contiguous (H, W) slices modified in place; the work is done on the pixels near the
    heart.
    """
    ti = p.intensity
    centre = p.tilt * t + p.heart_jitter[k]
    xh, yh = _rotate(u - centre[0], v - centre[1], p.rv_angle)  # heart frame: x points at the RV
    r_full = np.hypot(xh, yh)
    last = k == p.num_slices - 1
    R = lv_outer_radius(t, p)
    rv_t = rv_thickness(t, p)
    wrap = rv_wrap(t, p)
    w = p.rv_free_wall
    margin = 6.0 * p.scale
    amp = 1.0 + p.outer_wobble[0].sum() + 0.05
    reach = R * amp * max(p.lv_ecc, 1.0 / p.lv_ecc) + (rv_t + w) * (1.0 + p.rv_wobble[0].sum()) + margin + 2.0
    sel = np.flatnonzero(r_full.ravel() <= reach)
    img_f, lab_f = img.reshape(-1), label.reshape(-1)
    xs, ys, r = xh.ravel()[sel], yh.ravel()[sel], r_full.ravel()[sel]
    theta = np.arctan2(ys, xs)

    # LV: elliptical, wobbly epicardium and endocardium (slice-specific jitter on top of the per-volume shape)
    jit = rng.normal(0, 0.01, (2, 3)) * np.array([[1.0], [0.0]])
    ell = 1.0 / np.sqrt((np.cos(theta) / p.lv_ecc) ** 2 + (np.sin(theta) * p.lv_ecc) ** 2)
    r_out = R * ell * _wobble(theta, p.outer_wobble + jit)
    rc = lv_cavity_radius(t, p, last)
    r_cav = np.minimum(rc * ell * _wobble(theta, p.cavity_wobble), r_out - MIN_WALL * p.scale) if rc > 0 else 0.0
    lv_outer = r <= r_out
    cavity = r <= r_cav

    # RV: a crescent hugging the epicardium on the RV side (the septum is the shared myocardium)
    if rv_t > 0:
        rv_wob = _wobble(theta, p.rv_wobble)
        rv_region = (r <= r_out + _crescent(theta, rv_t, wrap, p.rv_skew) * rv_wob) & ~lv_outer
        heart = lv_outer | (r <= r_out + _crescent(theta, rv_t + w, wrap + w / R, p.rv_skew) * rv_wob)
        near = r <= r_out + margin + _crescent(theta, rv_t + margin, wrap + margin / R, p.rv_skew)
    else:
        rv_region = np.zeros_like(lv_outer)
        heart = lv_outer
        near = r <= r_out + margin

    # patchy pericardial fat around the heart
    patches = _smooth_noise(rng, img.shape, 3.5).ravel()[sel] > 0.5
    img_f[sel[near & patches & ~heart]] = ti["fat"]

    # basal slices: an unlabelled bright atrium next to the LV, behind a thin wall
    if p.atrium and t < 0.15:
        heart_full = np.zeros(img.shape, bool)
        heart_full.ravel()[sel[heart]] = True
        d = R + p.atrium_radius + 3.0
        ax, ay = d * math.cos(p.atrium_angle), d * math.sin(p.atrium_angle)
        ra, rb = p.atrium_radius, p.atrium_radius * 1.3
        img[_ellipse(xh, yh, ax, ay, ra + 2.0, rb + 2.0) & ~heart_full] = ti["myo"]
        img[_ellipse(xh, yh, ax, ay, ra, rb) & ~heart_full] = ti["blood"]

    if rv_t > 0:
        img_f[sel[heart & ~lv_outer]] = ti["myo"]  # thin RV free wall (background label)
        img_f[sel[rv_region]] = ti["rv_blood"]
        lab_f[sel[rv_region]] = 1

    lv = cavity
    if k == 0 and p.open_base:  # outflow tract: the ring opens and the LV label reaches the epicardium
        gap = np.abs(np.angle(np.exp(1j * (theta - p.open_angle)))) < p.open_halfwidth
        if rv_t > 0:  # keep the septum: never open the ring where it borders the RV
            gap &= _crescent(theta, 1.0, wrap + 0.35, p.rv_skew) == 0
        lv = cavity | (lv_outer & gap)
    myo = lv_outer & ~lv
    img_f[sel[myo]] = ti["myo"]
    lab_f[sel[myo]] = 2
    blood = ti["blood"] * (1.0 + p.blood_gradient * xs / max(R, 1.0))
    img_f[sel[lv]] = blood[lv]
    lab_f[sel[lv]] = 3
    if PAPILLARY_DEPTH[0] <= t <= PAPILLARY_DEPTH[1] and rc > 8.0:
        pr = p.papillary_radius * p.scale
        for ang in p.papillary_angles:  # dark muscles inside the cavity, labelled LV (as in ACDC)
            px, py = 0.62 * rc * math.cos(ang), 0.62 * rc * math.sin(ang)
            img_f[sel[_ellipse(xs, ys, px, py, pr, pr * 1.2) & cavity]] = ti["myo"] * 1.2


def _bias_field(xn: np.ndarray, yn: np.ndarray, zn: float, c: np.ndarray) -> np.ndarray:
    """Smooth multiplicative bias: exp of a quadratic polynomial in normalised (x, y) plus a linear term in z."""
    return np.exp(c[0] * xn + c[1] * yn + c[2] * xn**2 + c[3] * yn**2 + c[4] * xn * yn + c[5] * zn)


def _rician(img: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of a complex signal with Gaussian noise on both channels."""
    if sigma <= 0:
        return img
    n = rng.standard_normal((2,) + img.shape).astype(np.float32) * sigma
    return np.sqrt((img + n[0]) ** 2 + n[1] ** 2)


def _streams(seed: int) -> list[np.random.Generator]:
    """Independent random streams of one volume: parameters, heart, background, appearance."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(4)]


def patient_group(seed: int) -> tuple[str, float]:
    """(patient group, gamma) that ``make_volume(seed)`` draws: a key of PATHOLOGIES and the intensity exponent."""
    p = _draw_params(_streams(seed)[0], {})
    return p.pathology, p.gamma


def make_volume(seed: int, **options) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """One synthetic volume: image float32 (H, W, Z), label uint8 (H, W, Z), spacing (sx, sy, sz) in mm.

    Z is ordered base -> apex; labels 0 background, 1 RV, 2 Myo, 3 LV; the image is min-max scaled to [0, 1].
    Same seed (and options) -> identical arrays. Options (each overrides the seeded draw, others unchanged):
    num_slices (int >= 2), shape ((H, W) ints >= 64), in_plane_spacing (mm), slice_spacing (mm), noise_level (>= 0).
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    _check_options(options)
    # independent streams, so that e.g. a different noise level leaves the anatomy (and the labels) unchanged
    rng_params, rng_heart, rng_background, rng_appearance = _streams(seed)
    p = _draw_params(rng_params, options)
    (h, w), nz = p.shape, p.num_slices
    sx, sy, _ = p.spacing
    x = ((np.arange(h, dtype=np.float32) - (h - 1) / 2.0) * sx)[:, None] * np.ones((1, w), np.float32)
    y = ((np.arange(w, dtype=np.float32) - (w - 1) / 2.0) * sy)[None, :] * np.ones((h, 1), np.float32)
    xn, yn = x / (h * sx / 2.0), y / (w * sy / 2.0)
    image = np.zeros((h, w, nz), np.float32)
    label = np.zeros((h, w, nz), np.uint8)
    for k in range(nz):
        t = k / (nz - 1) if nz > 1 else 0.0
        dx, dy = p.anchor + p.slice_shifts[k]
        u, v = _rotate(x - dx, y - dy, p.chest_angle)
        img = np.zeros((h, w), np.float32)
        lab = np.zeros((h, w), np.uint8)
        drift = p.background_drift * (t - 0.5) * (nz - 1) * p.spacing[2]  # mm, zero at mid-ventricle
        _paint_background(img, u - drift[0], v - drift[1], t, p, rng_background)
        _render_heart(img, lab, u, v, t, k, p, rng_heart)
        label[..., k] = lab
        img *= 1.0 + p.texture * _smooth_noise(rng_appearance, (h, w), 3.0)
        img = ndimage.gaussian_filter(img, p.blur)
        img *= _bias_field(xn, yn, 2.0 * t - 1.0, p.bias)
        image[..., k] = _rician(img, p.noise, rng_appearance)
    image = (image / max(float(np.percentile(image, 99.0)), 1e-6)) ** p.gamma  # the gamma acts on the bulk range
    lo, hi = float(image.min()), float(image.max())
    image = (image - lo) / max(hi - lo, 1e-6)
    return image.astype(np.float32), label, p.spacing


# ---- writing ---------------------------------------------------------------------------------------------------------
def _save_atomic(array: np.ndarray, spacing: tuple[float, float, float], path: str) -> None:
    """Write a NIfTI file under a temporary name in the same folder, then rename it into place."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name[: -len('.nii.gz')]}.{uuid.uuid4().hex}.tmp.nii.gz")
    affine = np.diag([float(spacing[0]), float(spacing[1]), float(spacing[2]), 1.0])
    try:
        nib.save(nib.Nifti1Image(array, affine), tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def patient_seed(seed: int, index: int) -> int:
    """Seed of patient ``index`` (0-based) of a dataset drawn with ``seed``; independent of the dataset size."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def write_dataset(output_dir: str, num_patients: int = 30, seed: int = 0, overwrite: bool = False) -> list[dict]:
    """Write num_patients volumes in the ACDC layout.

    Returns [{"image": path, "label": path, "patient": "patient001"}, ...].

    ``<output_dir>/patientNNN/patientNNN_frame01.nii.gz`` (float32) and ``..._frame01_gt.nii.gz`` (uint8), affine
    diag(sx, sy, sz, 1). Same seed -> identical file contents; patient i uses ``patient_seed(seed, i)``, so adding
    patients does not change earlier ones. Existing complete pairs are kept unless ``overwrite``. Writes are atomic.
    """
    if not isinstance(output_dir, (str, os.PathLike)) or not str(output_dir):
        raise ValueError(f"output_dir must be a non-empty path, got {output_dir!r}")
    if isinstance(num_patients, bool) or not isinstance(num_patients, (int, np.integer)) or num_patients < 1:
        raise ValueError(f"num_patients must be an int >= 1, got {num_patients!r}")
    if num_patients > 999:
        raise ValueError(f"num_patients must be <= 999 (three-digit patient ids), got {num_patients}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    output_dir = os.fspath(output_dir)
    records, written = [], 0
    for i in range(int(num_patients)):
        patient = f"patient{i + 1:03d}"
        folder = os.path.join(output_dir, patient)
        image_path = os.path.join(folder, f"{patient}_frame01.nii.gz")
        label_path = os.path.join(folder, f"{patient}_frame01_gt.nii.gz")
        records.append({"image": image_path, "label": label_path, "patient": patient})
        if not overwrite and os.path.isfile(image_path) and os.path.isfile(label_path):
            continue
        os.makedirs(folder, exist_ok=True)
        image, label, spacing = make_volume(patient_seed(seed, i))
        _save_atomic(label, spacing, label_path)
        _save_atomic(image, spacing, image_path)
        written += 1
    logger.info(
        "synthetic cardiac data: %d patients in %s (%d written, %d already present)",
        num_patients, output_dir, written, num_patients - written,
    )
    return records
