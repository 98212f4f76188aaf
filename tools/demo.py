#!/usr/bin/env python
"""Segment the sounding objects of a real video file (with its audio track) using a checkpoint.

Each video frame at time t is paired with the audio window [t, t + WINDOW_SECONDS) (AVSBench's
frame <-> 1-s convention; padded by repetition at the end). Writes an overlay video
(``<output>/overlay.mp4``: frame | prediction) and, with ``--save-frames``, one PNG per frame.

    python tools/demo.py --config-file configs/synthetic/cpm_r18_demo.yaml \\
        --weights output/demo/model_final.pth --video my_clip.mp4 --output output/my_clip
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import cpm_d2  # noqa: E402,F401
from cpm_d2.config import setup_cfg  # noqa: E402


def decode_video(path, max_frames=None, fps=None):
    """-> (list of H x W x 3 uint8 RGB frames, their times in seconds, the video's frame rate)."""
    import av

    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        container = av.open(path)
    except Exception as e:
        raise ValueError(f"cannot open video file {path}: {e}") from e
    with container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        rate = float(stream.average_rate) if stream.average_rate else 25.0
        frames, times, next_time = [], [], 0.0
        for frame in container.decode(video=0):
            t = float(frame.time) if frame.time is not None else len(times) / rate
            if fps is not None and t + 1e-6 < next_time:
                continue
            frames.append(frame.to_ndarray(format="rgb24"))
            times.append(t)
            next_time = t + 1.0 / fps if fps else t
            if max_frames is not None and len(frames) >= max_frames:
                break
    if not frames:
        raise ValueError(f"{path}: the video stream holds no decodable frame")
    return frames, times, (fps or rate)


def decode_audio(path, sample_rate):
    """-> float32 tensor C x N at ``sample_rate`` (every channel of the first audio stream)."""
    import av
    import torch
    import torchaudio

    with av.open(path) as container:
        if not container.streams.audio:
            raise ValueError(f"{path} has no audio track: CPM needs the sound to segment sounding objects")
        stream = container.streams.audio[0]
        chunks = []
        for frame in container.decode(audio=0):
            arr = frame.to_ndarray()
            if arr.ndim == 1:
                arr = arr[None]
            if not frame.format.is_planar:  # packed: 1 x (N * C) interleaved
                arr = arr.reshape(-1, stream.channels).T
            chunks.append(arr.astype(np.float32))
        src_rate = stream.rate
    if not chunks:
        raise ValueError(f"{path}: the audio track holds no decodable sample")
    wave = torch.from_numpy(np.concatenate(chunks, axis=1))
    if src_rate != sample_rate:
        wave = torchaudio.functional.resample(wave, src_rate, sample_rate)
    return wave


def _test_resize(cfg):
    from detectron2.data import transforms as T

    if cfg.INPUT.TEST_RESIZE_MODE == "fixed":
        return T.Resize(tuple(cfg.INPUT.FIXED_SIZE))
    return T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")


def write_video(path, frames, fps):
    """Encode H x W x 3 uint8 RGB frames as an mp4 (H.264 when available, MPEG-4 otherwise)."""
    import av

    h, w = frames[0].shape[:2]
    h2, w2 = h - h % 2, w - w % 2  # yuv420p needs even sizes
    with av.open(path, mode="w") as container:
        try:
            stream = container.add_stream("libx264", rate=int(round(fps)))
        except Exception:
            stream = container.add_stream("mpeg4", rate=int(round(fps)))
        stream.width, stream.height, stream.pix_fmt = w2, h2, "yuv420p"
        for img in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img[:h2, :w2]), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def run(cfg, weights, video, output, metadata, max_frames=None, fps=None, save_frames=False, progress=True):
    """Segment ``video`` and write ``output/overlay.mp4`` (+ PNGs). Returns the overlay path."""
    import cv2
    import torch
    from tqdm import tqdm

    from cpm_d2.data.audio import AudioFrontEnd, slice_window
    from cpm_d2.utils.visualization import predicted_labels, side_by_side
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    if not os.path.isfile(weights):
        raise FileNotFoundError(f"checkpoint not found: {weights}")
    model = build_model(cfg)
    DetectionCheckpointer(model).load(weights)
    model.eval()

    frames, times, out_fps = decode_video(video, max_frames, fps)
    audio = AudioFrontEnd.from_config(cfg)
    sr = audio.config.sample_rate
    wave = decode_audio(video, sr)
    wave = wave.mean(0, keepdim=True) if audio.config.channels == 1 else (
        wave[:2] if wave.shape[0] >= 2 else wave.expand(2, -1)
    )
    window = int(round(cfg.INPUT.AUDIO.WINDOW_SECONDS * sr))
    resize = _test_resize(cfg)
    is_binary = bool(metadata.get("is_binary", False))

    os.makedirs(output, exist_ok=True)
    overlays = []
    iterator = tqdm(list(zip(frames, times)), desc="segmenting", disable=not progress)
    with torch.no_grad():
        for i, (rgb, t) in enumerate(iterator):
            mag = audio.magnitude(slice_window(wave, int(round(t * sr)), window))
            image = resize.get_transform(rgb).apply_image(rgb)
            inputs = {
                "image": torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))),
                "audio": audio.log(mag),
                "audio_mag": mag,
                "height": rgb.shape[0],
                "width": rgb.shape[1],
            }
            out = model([inputs])[0]
            panel = side_by_side(rgb, predicted_labels(out["sem_seg"], is_binary), None, metadata)
            overlays.append(panel)
            if save_frames:
                cv2.imwrite(os.path.join(output, f"frame_{i:05d}.png"), panel[:, :, ::-1])
    path = os.path.join(output, "overlay.mp4")
    write_video(path, overlays, out_fps)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--video", required=True, help="video file with an audio track (mp4, mkv, ...)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--dataset", default=None, help="registered dataset whose class names to show "
                        "(default: the config's first test dataset)")
    parser.add_argument("--max-frames", type=int, default=None)
    parser.add_argument("--fps", type=float, default=None, help="segment this many frames per second")
    parser.add_argument("--save-frames", action="store_true", help="also write one PNG per frame")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args(argv)

    from cpm_d2.data import register_avs_datasets_from_cfg
    from detectron2.data import MetadataCatalog

    cfg = setup_cfg(args.config_file, args.opts)
    register_avs_datasets_from_cfg(cfg)
    metadata = MetadataCatalog.get(args.dataset or cfg.DATASETS.TEST[0])
    path = run(cfg, args.weights, args.video, args.output, metadata, args.max_frames, args.fps, args.save_frames)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
