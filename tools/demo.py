#!/usr/bin/env python
"""Segment the sounding objects of a real video file (with its audio track) using a checkpoint.

A thin command line over :class:`cpm_d2.AVSPredictor` (docs/inference.md): each video frame at
time t is paired with the audio window [t, t + WINDOW_SECONDS) (AVSBench's frame <-> 1-s
convention; padded by repetition at the end), with the test resize and audio front end of
evaluation. Writes an overlay video (``<output>/overlay.mp4``: frame | prediction) and, with
``--save-frames``, one PNG per frame. The checkpoint must match the config exactly (pass
``--allow-partial-weights`` to use one that does not).

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
from cpm_d2.engine.predictor import decode_audio, decode_video, video_frame_rate  # noqa: E402,F401  (re-exported)


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


def run(cfg, weights, video, output, metadata, max_frames=None, fps=None, save_frames=False, progress=True,
        allow_partial_weights=False, batch_size=4):
    """Segment ``video`` and write ``output/overlay.mp4`` (+ PNGs). Returns the overlay path."""
    import cv2
    from tqdm import tqdm

    from cpm_d2.engine import AVSPredictor
    from cpm_d2.utils.visualization import side_by_side

    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = weights
    cfg.freeze()
    predictor = AVSPredictor(cfg, allow_partial_weights=allow_partial_weights, batch_size=batch_size,
                             class_names=metadata.get("stuff_classes", None))
    out_fps = fps or video_frame_rate(video)
    os.makedirs(output, exist_ok=True)
    overlays = []
    for pred in tqdm(predictor.iter_video(video, fps=fps, max_frames=max_frames), desc="segmenting",
                     disable=not progress):
        panel = side_by_side(pred["image"], pred["labels"].numpy(), None, metadata)
        overlays.append(panel)
        if save_frames:
            cv2.imwrite(os.path.join(output, f"frame_{pred['frame_index']:05d}.png"), panel[:, :, ::-1])
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
    parser.add_argument("--batch-size", type=int, default=4, help="frames per forward pass")
    parser.add_argument("--allow-partial-weights", action="store_true",
                        help="use a checkpoint that does not cover the model exactly (not recommended)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args(argv)

    from cpm_d2.data import register_avs_datasets_from_cfg
    from detectron2.data import MetadataCatalog

    cfg = setup_cfg(args.config_file, args.opts)
    register_avs_datasets_from_cfg(cfg)
    metadata = MetadataCatalog.get(args.dataset or cfg.DATASETS.TEST[0])
    path = run(cfg, args.weights, args.video, args.output, metadata, args.max_frames, args.fps, args.save_frames,
               allow_partial_weights=args.allow_partial_weights, batch_size=args.batch_size)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
