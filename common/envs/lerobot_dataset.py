"""LeRobot datasets (layout v3.0) in and out: demonstrations in the field's format.

The layout, as LeRobot's `LeRobotDataset` writes it (a local folder or a hub dataset id):

    meta/info.json        codebase_version "v3.0", fps, features {key: {dtype, shape, names[, info]}}, total_episodes,
                          total_frames, total_tasks, chunks_size, data_path, video_path (path templates), splits
    meta/tasks.parquet    one row per task string (the pandas index) with its task_index
    meta/episodes/chunk-000/file-000.parquet
                          one row per episode: episode_index, tasks, length, dataset_from_index / dataset_to_index
                          (its rows in the data files), data/chunk_index, data/file_index and, per video feature,
                          videos/{key}/chunk_index, file_index, from_timestamp, to_timestamp (its span in a shared mp4)
    meta/stats.json       per feature: min, max, mean, std, count (q01 and q99 too when written here)
    data/chunk-XXX/file-YYY.parquet
                          one row per frame: every non-video feature, timestamp, frame_index, episode_index, index,
                          task_index; "image" features as {bytes: PNG, path: null}
    videos/{key}/chunk-XXX/file-YYY.mp4
                          "video" features: the episodes' frames back to back

Read and written with pyarrow and ffmpeg (imageio-ffmpeg's binary decodes LeRobot's default AV1 and H.264): the
`lerobot` package itself pins torch < 2.11 and huggingface_hub < 0.36 and cannot be installed beside this project.

`LeRobotEpisodes` decodes one episode at a time, so a dataset need not fit in memory; each episode comes back as
the dict `common/envs/demos.py` uses (rgb, state, action, instruction, success, seed).
"""

import io
import json
import os
from typing import Optional

import numpy as np

CODEBASE_VERSION = "v3.0"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
# Default feature names, as LeRobot's LIBERO and ManiSkill conversions name them.
IMAGE_KEY, STATE_KEY, ACTION_KEY = "observation.images.image", "observation.state", "action"
_SCALAR = lambda dtype: {"dtype": dtype, "shape": [1], "names": None}
# The columns every LeRobot data file has besides its features.
DEFAULT_COLUMNS = {
    "timestamp": _SCALAR("float32"),
    "frame_index": _SCALAR("int64"),
    "episode_index": _SCALAR("int64"),
    "index": _SCALAR("int64"),
    "task_index": _SCALAR("int64"),
}


def is_lerobot_dataset(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "meta", "info.json"))


def resolve_dataset(path: str, flag: str) -> str:
    """A local dataset folder, or a hub dataset id downloaded (or found in the cache) with huggingface_hub."""
    if os.path.isdir(path):
        if not is_lerobot_dataset(path):
            raise FileNotFoundError(f"{flag} {path!r} has no meta/info.json: not a LeRobot dataset folder")
        return path
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(path, repo_type="dataset")
    except Exception as e:
        raise FileNotFoundError(f"{flag} {path!r}: no such folder, and no hub dataset of that id ({e})") from e
    if not is_lerobot_dataset(local):
        raise FileNotFoundError(f"{flag} {path!r} has no meta/info.json: not a LeRobot dataset")
    return local


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------
def _read_table(path: str) -> dict[str, list]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pydict()


def _decode_png(cell) -> np.ndarray:
    import imageio.v3 as iio

    data = cell["bytes"] if isinstance(cell, dict) else cell
    return np.asarray(iio.imread(io.BytesIO(data)))


def decode_video_span(path: str, start_s: float, num_frames: int) -> np.ndarray:
    """num_frames RGB frames (N, H, W, 3) uint8 of an mp4 from start_s on (ffmpeg's accurate seek)."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(
        path, pix_fmt="rgb24", input_params=["-ss", f"{start_s:.6f}"], output_params=["-frames:v", str(num_frames)]
    )
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader]
    if len(frames) != num_frames:
        raise ValueError(f"{path}: {len(frames)} frames from {start_s:.3f} s, the episode metadata says {num_frames}")
    return np.stack(frames)


class LeRobotEpisodes:
    """The episodes of a LeRobot v3.0 dataset, each decoded when asked for.

    image_key / state_key / action_key name the features to read (state_key None: no state); a missing one is
    refused with the dataset's feature names, naming `flag_prefix`-image-key etc."""

    def __init__(
        self,
        root: str,
        image_key: str = IMAGE_KEY,
        state_key: Optional[str] = STATE_KEY,
        action_key: str = ACTION_KEY,
        flag_prefix: str = "--dataset",
    ):
        import glob

        self.root = root
        with open(os.path.join(root, "meta", "info.json")) as f:
            self.info = json.load(f)
        version = self.info.get("codebase_version")
        if version != CODEBASE_VERSION:
            raise ValueError(
                f"{root}: LeRobot dataset version {version!r}; only {CODEBASE_VERSION!r} is read (convert older "
                "datasets with LeRobot's convert_dataset_v21_to_v30)"
            )
        features = self.info["features"]
        for flag, key in (("image-key", image_key), ("state-key", state_key), ("action-key", action_key)):
            if key is not None and key not in features:
                raise ValueError(f"{flag_prefix}-{flag} {key!r} is not a feature of {root}; it has {sorted(features)}")
        if features[image_key]["dtype"] not in ("image", "video"):
            raise ValueError(f"{flag_prefix}-image-key {image_key!r} is a {features[image_key]['dtype']}, not an image")
        self.image_key, self.state_key, self.action_key = image_key, state_key, action_key
        self.fps = float(self.info["fps"])
        tasks = _read_table(os.path.join(root, "meta", "tasks.parquet"))
        names = next(k for k in tasks if k != "task_index")  # the index column: "task" or "__index_level_0__"
        self.tasks = dict(zip(tasks["task_index"], tasks[names]))
        rows: dict[str, list] = {}
        for file in sorted(glob.glob(os.path.join(root, "meta", "episodes", "chunk-*", "file-*.parquet"))):
            for key, values in _read_table(file).items():
                rows.setdefault(key, []).extend(values)
        order = np.argsort(rows["episode_index"])
        self.episodes = [{key: rows[key][i] for key in rows} for i in order]
        self._data_file, self._data = None, None

    def __len__(self) -> int:
        return len(self.episodes)

    def _rows(self, meta: dict) -> dict[str, list]:
        """This episode's rows of its data file (the file is read once and kept while episodes come from it)."""
        file = DATA_PATH.format(chunk_index=meta["data/chunk_index"], file_index=meta["data/file_index"])
        if file != self._data_file:
            self._data_file, self._data = file, _read_table(os.path.join(self.root, file))
        index = self._data["index"]
        first = int(np.searchsorted(index, meta["dataset_from_index"]))
        return {key: values[first : first + meta["length"]] for key, values in self._data.items()}

    def __getitem__(self, i: int) -> dict:
        meta = self.episodes[i]
        rows = self._rows(meta)
        if self.info["features"][self.image_key]["dtype"] == "image":
            rgb = np.stack([_decode_png(cell) for cell in rows[self.image_key]])
        else:
            key = self.image_key
            video = VIDEO_PATH.format(
                video_key=key,
                chunk_index=meta[f"videos/{key}/chunk_index"],
                file_index=meta[f"videos/{key}/file_index"],
            )
            rgb = decode_video_span(
                os.path.join(self.root, video), meta[f"videos/{key}/from_timestamp"], meta["length"]
            )
        episode = {
            "rgb": rgb,
            "action": np.asarray(rows[self.action_key], dtype=np.float32),
            "instruction": self.tasks[rows["task_index"][0]],
            "success": bool(meta.get("success", True)),  # published demonstrations are successes
            "seed": int(meta.get("seed", -1)),
        }
        if self.state_key is not None:
            episode["state"] = np.asarray(rows[self.state_key], dtype=np.float32)
        return episode


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------
def _stats(values: np.ndarray) -> dict:
    """Per-dimension statistics of (N, D) values over the N frames."""
    values = values.astype(np.float64)
    stats = {"min": values.min(0), "max": values.max(0), "mean": values.mean(0), "std": values.std(0)}
    stats |= {"q01": np.quantile(values, 0.01, axis=0), "q99": np.quantile(values, 0.99, axis=0)}
    return {k: v.tolist() for k, v in stats.items()} | {"count": [len(values)]}


def _write_table(columns: dict[str, list], path: str, pandas_index: Optional[str] = None) -> None:
    """One parquet file. pandas_index: store that string column as the pandas index, as LeRobot's tasks.parquet has
    it (LeRobot looks tasks up by index)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(columns)
    if pandas_index is not None:
        kind = lambda name: ("unicode", "object") if name == pandas_index else ("int64", "int64")
        fields = [
            {"name": n, "field_name": n, "pandas_type": kind(n)[0], "numpy_type": kind(n)[1], "metadata": None}
            for n in table.column_names
        ]
        pandas_meta = {"index_columns": [pandas_index], "column_indexes": [], "columns": fields}
        table = table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path)


class LeRobotWriter:
    """Append episodes one at a time, then `close()`: a LeRobot v3.0 dataset in one chunk (one data parquet, one mp4
    per video feature; LeRobot's readers take files of any size).

    An episode: rgb (T, H, W, 3) uint8, state (T, S), action (T, A), instruction, and optionally success and seed
    (kept as extra columns of meta/episodes). video False: frames as lossless PNG "image" features, so the data is
    bit for bit the recorded one; video True: one H.264 yuv420p mp4 (lossy), as the hub datasets store cameras."""

    def __init__(
        self,
        root: str,
        fps: int,
        video: bool = False,
        robot_type: Optional[str] = None,
        image_key: str = IMAGE_KEY,
        state_key: str = STATE_KEY,
        action_key: str = ACTION_KEY,
        state_names: Optional[list[str]] = None,
        action_names: Optional[list[str]] = None,
    ):
        if is_lerobot_dataset(root):
            raise FileExistsError(f"{root!r} already holds a LeRobot dataset; choose a new folder")
        self.root, self.fps, self.video, self.robot_type = root, fps, video, robot_type
        self.keys = (image_key, state_key, action_key)
        self.names = (state_names, action_names)
        self.data: dict[str, list] = {k: [] for k in (state_key, action_key) + tuple(DEFAULT_COLUMNS)}
        if not video:
            self.data[image_key] = []
        self.episodes: dict[str, list] = {}
        self.tasks: list[str] = []
        self.frames = 0
        self.image_shape = None
        self.video_writer = None
        self.pixel_sum = self.pixel_sq = 0.0
        self.pixel_min, self.pixel_max = np.full(3, 255.0), np.zeros(3)

    def _open_video(self, height: int, width: int):
        import imageio_ffmpeg

        path = os.path.join(self.root, VIDEO_PATH.format(video_key=self.keys[0], chunk_index=0, file_index=0))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        writer = imageio_ffmpeg.write_frames(
            path, (width, height), fps=self.fps, codec="libx264", pix_fmt_out="yuv420p", macro_block_size=1
        )
        writer.send(None)  # start ffmpeg
        return writer

    def add_episode(self, episode: dict) -> None:
        import imageio.v3 as iio

        image_key, state_key, action_key = self.keys
        rgb = np.asarray(episode["rgb"], dtype=np.uint8)
        T = len(rgb)
        if self.image_shape is None:
            self.image_shape = rgb.shape[1:]
            if self.video:
                self.video_writer = self._open_video(*rgb.shape[1:3])
        if rgb.shape[1:] != self.image_shape:
            raise ValueError(f"episode {len(self.tasks)}: images {rgb.shape[1:]}, earlier ones {self.image_shape}")
        if episode["instruction"] not in self.tasks:
            self.tasks.append(episode["instruction"])
        index = len(self.episodes.get("episode_index", []))
        row = {
            "episode_index": index,
            "tasks": [episode["instruction"]],
            "length": T,
            "dataset_from_index": self.frames,
            "dataset_to_index": self.frames + T,
            "data/chunk_index": 0,
            "data/file_index": 0,
            "meta/episodes/chunk_index": 0,
            "meta/episodes/file_index": 0,
            "success": bool(episode.get("success", True)),
            "seed": int(episode.get("seed", -1)),
        }
        if self.video:
            self.video_writer.send(np.ascontiguousarray(rgb))
            row |= {
                f"videos/{image_key}/chunk_index": 0,
                f"videos/{image_key}/file_index": 0,
                f"videos/{image_key}/from_timestamp": self.frames / self.fps,
                f"videos/{image_key}/to_timestamp": (self.frames + T) / self.fps,
            }
        else:
            self.data[image_key] += [{"bytes": iio.imwrite("<bytes>", f, extension=".png"), "path": None} for f in rgb]
        for key, value in row.items():
            self.episodes.setdefault(key, []).append(value)
        self.data[state_key] += np.asarray(episode["state"], dtype=np.float32).tolist()
        self.data[action_key] += np.asarray(episode["action"], dtype=np.float32).tolist()
        self.data["timestamp"] += (np.arange(T, dtype=np.float32) / self.fps).tolist()
        self.data["frame_index"] += list(range(T))
        self.data["episode_index"] += [index] * T
        self.data["index"] += list(range(self.frames, self.frames + T))
        self.data["task_index"] += [self.tasks.index(episode["instruction"])] * T
        pixels = rgb.reshape(-1, 3).astype(np.float64) / 255.0  # image statistics per channel, in [0, 1]
        self.pixel_sum, self.pixel_sq = self.pixel_sum + pixels.sum(0), self.pixel_sq + (pixels**2).sum(0)
        self.pixel_min, self.pixel_max = (
            np.minimum(self.pixel_min, pixels.min(0)),
            np.maximum(self.pixel_max, pixels.max(0)),
        )
        self.frames += T

    def close(self) -> None:
        """Write the parquet files and meta/; info.json comes last, so a folder with it is a finished dataset."""
        if not self.frames:
            raise ValueError(f"{self.root!r}: no episodes were added")
        if self.video_writer is not None:
            self.video_writer.close()
        image_key, state_key, action_key = self.keys
        height, width = self.image_shape[:2]
        _write_table(self.data, os.path.join(self.root, DATA_PATH.format(chunk_index=0, file_index=0)))
        _write_table(self.episodes, os.path.join(self.root, EPISODES_PATH.format(chunk_index=0, file_index=0)))
        tasks = {"task_index": list(range(len(self.tasks))), "task": self.tasks}
        _write_table(tasks, os.path.join(self.root, "meta", "tasks.parquet"), pandas_index="task")

        image = {"dtype": "video" if self.video else "image", "shape": [height, width, 3]}
        image["names"] = ["height", "width", "channels"]
        if self.video:
            image["info"] = {
                "video.height": height,
                "video.width": width,
                "video.codec": "h264",
                "video.pix_fmt": "yuv420p",
                "video.is_depth_map": False,
                "video.fps": self.fps,
                "video.channels": 3,
                "has_audio": False,
            }
        state, action = np.asarray(self.data[state_key]), np.asarray(self.data[action_key])
        features = {
            image_key: image,
            state_key: {"dtype": "float32", "shape": [state.shape[1]], "names": self.names[0]},
            action_key: {"dtype": "float32", "shape": [action.shape[1]], "names": self.names[1]},
        } | DEFAULT_COLUMNS
        n = len(self.episodes["episode_index"])
        info = {
            "codebase_version": CODEBASE_VERSION,
            "robot_type": self.robot_type,
            "total_episodes": n,
            "total_frames": self.frames,
            "total_tasks": len(self.tasks),
            "chunks_size": 1000,
            "data_files_size_in_mb": 100,
            "video_files_size_in_mb": 200,
            "fps": self.fps,
            "splits": {"train": f"0:{n}"},
            "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if self.video else None,
            "features": features,
        }
        count = self.frames * height * width
        mean = self.pixel_sum / count
        std = np.sqrt(np.maximum(self.pixel_sq / count - mean**2, 0.0))
        per_channel = lambda v: np.asarray(v).reshape(3, 1, 1).tolist()  # LeRobot's (C, 1, 1) image statistics
        image_stats = {"min": per_channel(self.pixel_min), "max": per_channel(self.pixel_max)}
        image_stats |= {"mean": per_channel(mean), "std": per_channel(std), "count": [self.frames]}
        stats = {image_key: image_stats, state_key: _stats(state), action_key: _stats(action)}
        for name, content in (("stats.json", stats), ("info.json", info)):
            with open(os.path.join(self.root, "meta", name), "w") as f:
                json.dump(content, f, indent=2)
