"""Rendering of one synthetic per-component AOI crop under several lightings (pure numpy).

A scene is a set of layers on the pixel grid: albedo (RGB), height and metal weight. Shapes
are soft boxes in a component frame (rotated, jittered) or the board frame (pads, traces,
silkscreen). Every lighting shades the same scene as an AOI ring light at some elevation
seen from straight above: diffuse light falls off with elevation on flat areas and rises on
slopes; metal reflects specularly where its tilt mirrors the ring into the camera, so a low
ring lights steep edges, a mid ring lights solder fillets and a coaxial light flat metal.
Geometry is designed in units of 1/100 of the crop size.
"""

import zlib
from dataclasses import dataclass

import numpy as np

MASK_GREEN = (0.10, 0.34, 0.17)
TRACE_GREEN = (0.17, 0.45, 0.20)
PAD_SILVER = (0.78, 0.78, 0.74)
SOLDER = (0.80, 0.80, 0.78)
SILK_WHITE = (0.90, 0.90, 0.85)
BODY_COLOURS = {"R": (0.08, 0.08, 0.09), "C": (0.62, 0.48, 0.30), "D": (0.10, 0.10, 0.11),
                "Q": (0.07, 0.07, 0.08), "U": (0.07, 0.07, 0.08)}
# name -> (elevation in degrees, or None for a diffuse dome; RGB tint)
LIGHT_PRESETS = {
    "LowAngleLight": (12.0, (0.70, 0.85, 1.15)),
    "SolderLight": (40.0, (1.08, 1.00, 0.85)),
    "UniformLight": (None, (1.00, 1.00, 1.00)),
    "WhiteLight": (88.0, (1.00, 1.00, 1.00)),
}


@dataclass(frozen=True)
class Component:
    """One placement: type letter, body size and pad layout, in design units."""

    kind: str  # R, C, D (two terminals) or Q, U (SOT-23, three leads)
    length: float
    width: float
    height: float


@dataclass(frozen=True)
class Shot:
    """How one photo of a component differs from the nominal design."""

    offset: tuple[float, float] = (0.0, 0.0)  # component placement, design units
    angle: float = 0.0  # component rotation, degrees
    camera: tuple[float, float] = (0.0, 0.0)  # whole-image misalignment, pixels
    solder: tuple[float, float] = (1.0, 1.0)  # fillet volume per end
    missing: bool = False
    tombstone: int = 0  # +1 / -1: that end lifted
    bridge: float = 0.0  # width of a solder bridge, 0: none
    scratch: tuple[float, float, float, float, float] | None = None  # x, y, angle, length, width
    particle: tuple[float, float, float, float, float, float, float] | None = None  # x, y, rx, ry, r, g, b
    gains: tuple[float, ...] = ()  # per light brightness gain
    noise: float = 0.0  # sensor noise sigma (0-255 scale)


def light_preset(name: str) -> tuple[float | None, tuple[float, float, float]]:
    """Elevation and tint of a lighting; unknown names get a stable preset from a CRC."""
    if name in LIGHT_PRESETS:
        return LIGHT_PRESETS[name]
    code = zlib.crc32(name.encode())
    elevation = 10.0 + (code % 80)
    tint = tuple(0.8 + 0.4 * ((code >> shift) & 0xFF) / 255 for shift in (8, 16, 24))
    return elevation, tint


def render(component: Component, shot: Shot, lights: tuple[str, ...], size: tuple[int, int],
           rng: np.random.Generator) -> list[np.ndarray]:
    """One ``(H, W, 3)`` uint8 image per lighting of ``component`` as ``shot`` sees it."""
    albedo, height, metal = _scene(component, shot, size, rng)
    images = []
    for index, light in enumerate(lights):
        elevation, tint = light_preset(light)
        rgb = _shade(albedo, height, metal, elevation, size) * np.asarray(tint)
        gain = shot.gains[index] if index < len(shot.gains) else 1.0
        rgb = rgb * gain * 255.0 + rng.normal(0.0, shot.noise, rgb.shape)
        images.append(np.clip(rgb, 0, 255).astype(np.uint8))
    return images


def _scene(component: Component, shot: Shot, size: tuple[int, int], rng: np.random.Generator):
    width, height_px = size
    unit = min(width, height_px) / 100.0
    ys, xs = np.mgrid[0:height_px, 0:width].astype(np.float64)
    # board frame in design units, origin at the crop centre, shifted by camera misalignment
    bx = (xs + 0.5 - width / 2 - shot.camera[0]) / unit
    by = (ys + 0.5 - height_px / 2 - shot.camera[1]) / unit
    soft = 0.7 / unit

    texture = _texture(rng, (height_px, width))
    albedo = np.empty((height_px, width, 3))
    albedo[:] = MASK_GREEN
    albedo *= (0.9 + 0.2 * texture)[..., None]
    height = np.zeros((height_px, width))
    metal = np.zeros((height_px, width))

    def paint(mask, colour, level, shine, additive=False):
        nonlocal height
        albedo[:] = albedo * (1 - mask[..., None]) + mask[..., None] * np.asarray(colour)
        height = height + mask * level if additive else np.maximum(height, mask * level)
        metal[:] = metal * (1 - mask) + mask * shine

    pads = _pad_centres(component)
    half_pad = (9.0, 14.0) if component.kind in "RCD" else (5.0, 6.5)
    for px, py in pads:  # traces run from each pad to the nearest image border
        horizontal = component.kind in "RCD"
        trace = (_box(bx - px * 2.2, by - py, 1.3 * abs(px), 3.0, soft) if horizontal
                 else _box(bx - px, by - py * 2.2, 3.0, 1.3 * abs(py), soft))
        paint(trace, TRACE_GREEN, 0.3, 0.0)
    for px, py in pads:
        paint(_box(bx - px, by - py, *half_pad, soft), PAD_SILVER, 0.5, 0.8)
    outline = component.length / 2 + 16, component.width / 2 + 14
    ring = _box(bx, by, *outline, soft) - _box(bx, by, outline[0] - 1.6, outline[1] - 1.6, soft)
    paint(np.clip(ring, 0, 1), SILK_WHITE, 0.2, 0.0)

    if shot.missing:
        for px, py in pads:  # bare pads with flat, dull solder paste
            paint(0.8 * _box(bx - px, by - py, half_pad[0] - 2, half_pad[1] - 2, soft), SOLDER, 0.9, 0.4)
    else:
        _paint_component(component, shot, bx, by, soft, paint)
    if shot.bridge > 0:
        _paint_bridge(component, shot.bridge, bx, by, soft, paint)
    if shot.scratch is not None:
        x, y, angle, length, stroke = shot.scratch
        u, v = _rotate(bx - x, by - y, angle)
        groove = _box(u, v, length / 2, stroke / 2, soft)
        albedo[:] = albedo * (1 - 0.55 * groove[..., None]) + 0.55 * groove[..., None] * 0.75
        height = height - 0.6 * groove
    if shot.particle is not None:
        x, y, rx, ry, *colour = shot.particle
        blob = np.clip(1.2 - ((bx - x) / rx) ** 2 - ((by - y) / ry) ** 2, 0, 1)
        paint(np.minimum(blob * 3, 1), colour, 2.5 * blob.max(), 0.0, additive=True)
    return albedo, height, metal


def _paint_component(component: Component, shot: Shot, bx, by, soft, paint) -> None:
    u, v = _rotate(bx - shot.offset[0], by - shot.offset[1], shot.angle)
    half_l, half_w = component.length / 2, component.width / 2
    if component.kind in "RCD":
        term = 0.18 * component.length
        body_half, centre, lift = half_l, 0.0, 1.0
        if shot.tombstone:  # one end standing up: shorter in projection, taller at the other end
            body_half, centre = half_l * 0.6, shot.tombstone * -half_l * 0.4
            lift = 2.2
        uc = u - centre
        for end, volume in ((-1, shot.solder[0]), (1, shot.solder[1])):
            if shot.tombstone == end:
                continue  # the lifted end has no fillet
            reach = 8.0 * max(volume, 0.05)
            along = np.clip((end * u - half_l) / reach, 0, 1)
            fillet = _box(end * u - half_l - reach / 2, v, reach / 2, half_w * 0.9, soft)
            paint(fillet, SOLDER, component.height * 0.9 * volume * (1 - along) ** 1.5 + 0.5, 1.0)
        body = _box(uc, v, body_half - term, half_w, soft)
        terms = _box(np.abs(uc) - body_half + term / 2, v, term / 2, half_w, soft)
        ramp = 1.0 + (lift - 1.0) * np.clip(0.5 - shot.tombstone * uc / (2 * body_half), 0, 1)
        paint(terms, PAD_SILVER, component.height * ramp, 1.0)
        paint(body, BODY_COLOURS[component.kind], component.height * ramp, 0.0)
        top = _box(uc, v, body_half - term - 2.5, half_w - 2.5, soft)
        if component.kind == "R":
            paint(0.5 * top, (0.25, 0.25, 0.27), component.height * ramp + 0.3, 0.0)
        if component.kind == "D":
            stripe = _box(uc + body_half - term - 4, v, 2.2, half_w, soft)
            paint(stripe, SILK_WHITE, component.height + 0.1, 0.0)
    else:
        for index, (lx, ly) in enumerate(_lead_positions(component)):
            volume = shot.solder[index % 2]
            lead = _box(u - lx, v - ly * 0.82, 2.6, abs(ly) * 0.32, soft)
            paint(lead, PAD_SILVER, 1.5, 1.0)
            fillet = _box(u - lx, v - ly, 3.2, 2.5 * max(volume, 0.1), soft)
            paint(fillet, SOLDER, 0.6 + 1.4 * volume, 1.0)
        paint(_box(u, v, half_l, half_w, soft), BODY_COLOURS[component.kind], component.height, 0.0)
        pin_one = 0.7 * _box(u + half_l - 4, v + half_w - 4, 1.5, 1.5, soft)
        paint(pin_one, SILK_WHITE, component.height + 0.1, 0.0)


def _paint_bridge(component: Component, width: float, bx, by, soft, paint) -> None:
    if component.kind in "RCD":  # a solder trail along the body, pad to pad
        y = component.width / 2 + 2 + width / 2
        paint(_box(bx, by - y, component.length / 2 + 3, width / 2, soft), SOLDER, 1.2, 1.0)
    else:  # between the two leads on the same side
        (x0, y0), (x1, _) = _lead_positions(component)[:2]
        paint(_box(bx - (x0 + x1) / 2, by - y0, abs(x1 - x0) / 2, width / 2, soft), SOLDER, 1.2, 1.0)


def _pad_centres(component: Component) -> list[tuple[float, float]]:
    if component.kind in "RCD":
        x = component.length / 2 + 2
        return [(-x, 0.0), (x, 0.0)]
    return [(x, y * 1.05) for x, y in _lead_positions(component)]


def _lead_positions(component: Component) -> list[tuple[float, float]]:
    x, y = component.length * 0.32, component.width / 2 + 8
    return [(-x, -y), (x, -y), (0.0, y)]


def _shade(albedo, height, metal, elevation, size) -> np.ndarray:
    unit = min(size) / 100.0
    gy, gx = np.gradient(height * unit * 0.9)
    tilt = np.arctan(np.hypot(gx, gy))
    if elevation is None:  # dome: soft, even light, little specular
        diffuse = 0.85 + 0.15 * np.cos(tilt)
        specular = 0.25 * metal
    else:
        e = np.radians(elevation)
        diffuse = 0.12 + np.clip(np.cos(tilt) * np.sin(e) + 0.9 * np.sin(tilt) * np.cos(e), 0, 1)
        mirror = np.radians((90.0 - elevation) / 2)
        specular = metal * np.exp(-(((tilt - mirror) / np.radians(9.0)) ** 2))
    lit = albedo * (diffuse * (1 - 0.6 * metal))[..., None] + 0.95 * specular[..., None]
    return np.clip(lit, 0, 1.2)


def _box(u, v, half_u, half_v, soft):
    """Soft-edged rectangle of half sizes ``half_u``/``half_v`` centred at u = v = 0."""
    return _sigmoid((half_u - np.abs(u)) / soft) * _sigmoid((half_v - np.abs(v)) / soft)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))


def _rotate(x, y, degrees):
    angle = np.radians(degrees)
    cos, sin = np.cos(angle), np.sin(angle)
    return cos * x + sin * y, -sin * x + cos * y


def _texture(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Smooth solder-mask mottling in [0, 1]: coarse noise upsampled bilinearly."""
    coarse = rng.random((shape[0] // 6 + 2, shape[1] // 6 + 2))
    rows = np.linspace(0, coarse.shape[0] - 1.001, shape[0])
    cols = np.linspace(0, coarse.shape[1] - 1.001, shape[1])
    r0, c0 = rows.astype(int), cols.astype(int)
    fr, fc = (rows - r0)[:, None], (cols - c0)[None, :]
    top = coarse[r0][:, c0] * (1 - fc) + coarse[r0][:, c0 + 1] * fc
    bottom = coarse[r0 + 1][:, c0] * (1 - fc) + coarse[r0 + 1][:, c0 + 1] * fc
    return top * (1 - fr) + bottom * fr
