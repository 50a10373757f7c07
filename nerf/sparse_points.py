"""A capture's sparse 3D points (the `.ply` nerfstudio names in `ply_file_path`) and the depth bounds they give.

`read_ply_points` reads the vertex positions x, y, z of a PLY file (ascii,
binary_little_endian or binary_big_endian; other elements and properties are
skipped), as `ns-process-data` writes them beside its transforms.json, in the
frames' world coordinates. `point_bounds` turns them into near and far bounds
the way LLFF's imgs2poses does with COLMAP's points: per camera, the 0.1 and
99.9 percentiles of the depths of the points it sees, then near = 0.9 x the
smallest, far = the largest (the LLFF loader's `--no_ndc` bounds).
"""
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from nerf.errors import DataError

PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
             "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
             "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}
NEAR_PERCENTILE, FAR_PERCENTILE = 0.1, 99.9      # as nerf.colmap_model (LLFF's imgs2poses)


def _header(data: bytes, path: Path) -> Tuple[str, List[Tuple[str, int, List[Tuple[str, str]]]], int]:
    """(format, [(element name, count, [(property, dtype)])], offset of the body) of a PLY file's bytes."""
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise DataError(path, "not a PLY file (no 'ply' ... 'end_header')")
    body = data.index(b"\n", end) + 1
    fmt, elements = None, []
    for line in data[:end].decode("ascii", "replace").splitlines()[1:]:
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format" and len(words) >= 2:
            fmt = words[1]
        elif words[0] == "element" and len(words) == 3 and words[2].isdigit():
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property" and elements and len(words) == 3 and words[1] in PLY_TYPES:
            elements[-1][2].append((words[2], PLY_TYPES[words[1]]))
        else:
            raise DataError(path, f"PLY header line {line.strip()!r} is not understood here (list properties "
                                  "are not read; write the points as a vertex element of x, y, z)")
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise DataError(path, f"PLY format {fmt!r} is not ascii or binary")
    return fmt, elements, body


def read_ply_points(path) -> np.ndarray:
    """The vertex positions (P, 3) float64 of a PLY file; one DataError line for anything unreadable."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(path, f"cannot read the sparse points ({exc.strerror or exc})") from None
    fmt, elements, body = _header(data, path)
    if not elements or elements[0][0] != "vertex":
        raise DataError(path, "PLY's first element is not 'vertex'")
    _, count, properties = elements[0]
    names = [name for name, _ in properties]
    if not {"x", "y", "z"} <= set(names):
        raise DataError(path, "PLY vertices have no x, y, z")
    try:
        if fmt == "ascii":
            lines = data[body:].decode("ascii").split("\n")[:count]
            table = np.array([line.split()[:len(names)] for line in lines], dtype=np.float64)
            xyz = table.reshape(count, len(names))[:, [names.index(k) for k in "xyz"]]
        else:
            order = "<" if fmt == "binary_little_endian" else ">"
            dtype = np.dtype([(name, order + kind) for name, kind in properties])
            table = np.frombuffer(data, dtype=dtype, count=count, offset=body)
            xyz = np.stack([table[k].astype(np.float64) for k in "xyz"], -1)
    except (ValueError, UnicodeDecodeError):
        raise DataError(path, f"PLY body does not hold the {count} vertices its header announces") from None
    if not len(xyz) or not np.isfinite(xyz).all():
        raise DataError(path, "PLY holds no vertices, or a non-finite one")
    return xyz


def point_bounds(points: np.ndarray, poses: np.ndarray, K: np.ndarray, H: int, W: int) -> Optional[Tuple[float, float]]:
    """(near, far) from the points (P, 3) each camera sees: poses (N, 3 or 4, 4)
    camera-to-world in the OpenGL convention (looking along -z), K (3, 3) of
    H x W images in get_rays' pixel coordinates. A point is seen when it lies
    in front of the camera and projects inside the image. Per camera the
    NEAR_PERCENTILE and FAR_PERCENTILE of the seen depths; near = 0.9 x the
    smallest, far = the largest. None when no camera sees any point."""
    lows, highs = [], []
    for c2w in np.asarray(poses, dtype=np.float64):
        local = (points - c2w[:3, 3]) @ c2w[:3, :3]            # camera axes x right, y up, z back
        depth = -local[:, 2]
        front = depth > 0
        u = K[0, 0] * local[front, 0] / depth[front] + K[0, 2]
        v = -K[1, 1] * local[front, 1] / depth[front] + K[1, 2]
        seen = depth[front][(u >= -0.5) & (u <= W - 0.5) & (v >= -0.5) & (v <= H - 0.5)]
        if len(seen):
            lows.append(np.percentile(seen, NEAR_PERCENTILE))
            highs.append(np.percentile(seen, FAR_PERCENTILE))
    if not lows:
        return None
    return 0.9 * float(min(lows)), float(max(highs))


def write_ply_points(path, xyz: np.ndarray, rgb: np.ndarray) -> None:
    """Points xyz (P, 3) with colours rgb (P, 3) uint8 as a binary little-endian PLY (what `read_ply_points`
    and nerfstudio read)."""
    table = np.empty(len(xyz), dtype=[("x", "<f8"), ("y", "<f8"), ("z", "<f8"),
                                      ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    for k, name in enumerate("xyz"):
        table[name] = xyz[:, k]
    for k, name in enumerate(("red", "green", "blue")):
        table[name] = rgb[:, k]
    header = (f"ply\nformat binary_little_endian 1.0\nelement vertex {len(xyz)}\nproperty double x\n"
              "property double y\nproperty double z\nproperty uchar red\nproperty uchar green\n"
              "property uchar blue\nend_header\n")
    Path(path).write_bytes(header.encode("ascii") + table.tobytes())
