"""Procedural, seedable videos whose structure attention must follow across space and time.

Each video: a textured background that pans with the camera, and several textured objects (discs
and boxes) that move with one of a few motion classes, occlude each other by depth, and may appear
or disappear part way. The motion class of the first object is the video's label (conditioning).

``make_batch(n, frames, height, width, seed)`` -> ``(videos [n, 3, frames, height, width] in
[-1, 1], labels [n])``. Everything is drawn from ``torch.Generator(seed)``: same seed, same videos.
No downloads.
"""

from __future__ import annotations

import math

import torch

MOTIONS = ("linear", "circular", "bounce", "zigzag")


def _texture(g: torch.Generator, h: int, w: int) -> torch.Tensor:
    """``[3, h, w]`` smooth random texture (sum of a few oriented sinusoids)."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    tex = torch.zeros(3, h, w)
    for _ in range(3):
        freq = 2 + 6 * torch.rand(1, generator=g).item()
        angle = math.pi * torch.rand(1, generator=g).item()
        phase = 2 * math.pi * torch.rand(1, generator=g).item()
        wave = torch.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)) + phase)
        tex += torch.rand(3, 1, 1, generator=g) * wave
    color = torch.rand(3, 1, 1, generator=g) * 2 - 1
    return (0.6 * color + 0.4 * tex / 3).clamp(-1, 1)


def _path(motion: str, t: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Object centre (y, x) in [0, 1] over normalized time ``t``."""
    y0, x0 = 0.2 + 0.6 * torch.rand(2, generator=g)
    speed = 0.3 + 0.5 * torch.rand(1, generator=g).item()
    angle = 2 * math.pi * torch.rand(1, generator=g).item()
    if motion == "linear":
        y, x = y0 + speed * t * math.sin(angle), x0 + speed * t * math.cos(angle)
    elif motion == "circular":
        r = 0.1 + 0.15 * torch.rand(1, generator=g).item()
        y, x = (
            y0 + r * torch.sin(2 * math.pi * t + angle),
            x0 + r * torch.cos(2 * math.pi * t + angle),
        )
    elif motion == "bounce":
        y = y0 - 0.4 * (4 * (t - 0.5) ** 2 * -1 + 1) * speed
        x = x0 + 0.3 * speed * t * math.cos(angle)
    else:  # zigzag
        y = y0 + 0.15 * torch.sign(torch.sin(6 * math.pi * t)) * t
        x = x0 + speed * t * math.cos(angle)
    return y.remainder(1.0), x.remainder(1.0)


def make_video(
    g: torch.Generator, frames: int, height: int, width: int, objects: int = 4
) -> tuple[torch.Tensor, int]:
    """One ``[3, frames, height, width]`` video in [-1, 1] and its label."""
    pan = (torch.rand(2, generator=g) - 0.5) * 0.5  # camera pan over the clip (fraction of size)
    bg = _texture(g, 2 * height, 2 * width)
    t = torch.linspace(0, 1, frames)
    video = torch.empty(3, frames, height, width)
    for f in range(frames):
        oy = int((0.25 + pan[0] * t[f]) * height) % height
        ox = int((0.25 + pan[1] * t[f]) * width) % width
        video[:, f] = bg[:, oy : oy + height, ox : ox + width]
    yy, xx = torch.meshgrid(
        torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij"
    )
    label = 0
    depth_order = torch.randperm(objects, generator=g).tolist()
    specs = []
    for i in range(objects):
        motion = int(torch.randint(len(MOTIONS), (1,), generator=g))
        if i == 0:
            label = motion
        y, x = _path(MOTIONS[motion], t, g)
        size = 0.08 + 0.12 * torch.rand(1, generator=g).item()
        disc = bool(torch.rand(1, generator=g).item() < 0.5)
        start, stop = 0, frames
        if i > 0 and torch.rand(1, generator=g).item() < 0.4:  # appears or disappears
            cut = int(torch.randint(1, max(frames - 1, 2), (1,), generator=g))
            start, stop = (cut, frames) if torch.rand(1, generator=g).item() < 0.5 else (0, cut)
        specs.append((depth_order[i], y, x, size, disc, start, stop, _texture(g, height, width)))
    for _, y, x, size, disc, start, stop, tex in sorted(specs, key=lambda s: s[0]):
        for f in range(start, stop):
            dy, dx = yy - y[f], xx - x[f]
            inside = (dy**2 + dx**2 < size**2) if disc else (dy.abs() < size) & (dx.abs() < size)
            video[:, f] = torch.where(inside, tex, video[:, f])
    return video, label


def make_batch(
    n: int, frames: int, height: int, width: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` videos ``[n, 3, frames, height, width]`` and labels ``[n]``, from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    videos, labels = zip(*(make_video(g, frames, height, width) for _ in range(n)), strict=True)
    return torch.stack(videos), torch.tensor(labels)
