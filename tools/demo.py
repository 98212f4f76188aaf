#!/usr/bin/env python
"""Segment the sounding objects of a video, a folder of frames with a wav, or an AVS clip folder.

A thin command line over :class:`cpm_d2.AVSPredictor` (docs/inference.md). ``--input`` is

* a video file with an audio track (mp4, mkv, ...);
* a folder of frames ``0.jpg, 1.jpg, ...`` with ``--audio clip.wav`` (frame i of n over a D-second
  track at i * D / n, as the dataset loader pairs them; ``--fps`` sets the frames' rate instead);
* an AVS clip folder (AVSBench-Semantics layout): ``frames/`` and ``audio.wav``.

Each frame at time t is paired with the audio window [t, t + WINDOW_SECONDS), with the test resize
and audio front end of evaluation. The input is checked before the model is built (a video
without an audio track is an error and nothing is written). Frames are read, segmented and
written one at a time (memory does not grow with the length), to ``<output>/overlay.mp4``
(frame | prediction) with the input's sound, and with ``--save-frames`` to one PNG per frame.
The checkpoint must match the config exactly (``--allow-partial-weights`` to use one that does not).

    python tools/demo.py --config-file configs/synthetic/cpm_r18_demo.yaml \\
        --weights output/demo/model_final.pth --input my_clip.mp4 --output output/my_clip
    python tools/demo.py ... --input clip/frames --audio clip/audio.wav --output output/clip \\
        --opts MODEL.DEVICE cuda
"""
import argparse
import os
from fractions import Fraction

import numpy as np

import cpm_d2  # noqa: F401
from cpm_d2.config import setup_cfg
from cpm_d2.engine.predictor import decode_audio, decode_video, video_frame_rate  # noqa: F401  (re-exported)

# Sample rates the AAC encoder takes; a track at another rate is resampled to 48 kHz for the video.
_AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)
_AAC_FRAME = 1024  # samples per AAC frame


class OverlayVideo:
    """An mp4 written one panel at a time (H.264 when the bundled FFmpeg has it, MPEG-4 otherwise), with
    ``wave`` (float ``C x N`` at ``sample_rate``) as its AAC sound track, interleaved with the frames.

    Written to ``<path>.tmp.mp4`` and renamed to ``path`` by :meth:`close`; :meth:`abort` removes it.
    """

    def __init__(self, path, fps, wave, sample_rate):
        import torchaudio

        self.path, self.tmp = path, path + ".tmp.mp4"
        self.rate = Fraction(fps).limit_denominator(1001)
        wave = wave[:2].float()
        if int(sample_rate) not in _AAC_RATES:
            wave, sample_rate = torchaudio.functional.resample(wave, int(sample_rate), 48000), 48000
        self.wave, self.sample_rate = np.ascontiguousarray(wave.clamp(-1, 1).numpy(), dtype=np.float32), int(sample_rate)
        self.container, self.video, self.audio = None, None, None
        self.frames, self.samples = 0, 0

    def _open(self, height, width):
        import av

        self.container = av.open(self.tmp, mode="w", format="mp4")
        try:
            self.video = self.container.add_stream("libx264", rate=self.rate)
        except Exception:
            self.video = self.container.add_stream("mpeg4", rate=self.rate)
        self.video.width, self.video.height, self.video.pix_fmt = width, height, "yuv420p"
        self.audio = self.container.add_stream("aac", rate=self.sample_rate)
        self.audio.layout = "stereo" if self.wave.shape[0] == 2 else "mono"

    def _mux_audio(self, upto, final=False):
        import av

        upto = min(upto, self.wave.shape[1])
        while self.samples < upto and (final or upto - self.samples >= _AAC_FRAME):
            chunk = self.wave[:, self.samples : self.samples + _AAC_FRAME]
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout=self.audio.layout)
            frame.sample_rate, frame.pts, frame.time_base = self.sample_rate, self.samples, Fraction(1, self.sample_rate)
            self.container.mux(self.audio.encode(frame))
            self.samples += chunk.shape[1]

    def add(self, panel):
        """Append one ``H x W x 3`` uint8 RGB panel (every panel the size of the first)."""
        import av

        h, w = panel.shape[0] - panel.shape[0] % 2, panel.shape[1] - panel.shape[1] % 2  # yuv420p: even sizes
        if self.container is None:
            self._open(h, w)
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(panel[:h, :w]), format="rgb24")
        frame.pts, frame.time_base = self.frames, 1 / self.rate
        self.container.mux(self.video.encode(frame))
        self.frames += 1
        self._mux_audio(int(self.frames / self.rate * self.sample_rate))

    def close(self):
        """Flush both streams (the rest of the track included) and move the file into place. Returns its path."""
        if self.container is None:
            raise ValueError("no frame was segmented: nothing to write")
        self.container.mux(self.video.encode())
        self._mux_audio(self.wave.shape[1], final=True)
        self.container.mux(self.audio.encode())
        self.container.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self):
        if self.container is not None:
            try:
                self.container.close()
            except Exception:
                pass
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def run(cfg, weights, source, output, metadata, *, save_frames=False, progress=True, allow_partial_weights=False,
        batch_size=4):
    """Segment ``source`` (an :class:`cpm_d2.engine.av_input.AVInput`) and write ``output/overlay.mp4``
    (+ PNGs); class names from ``metadata`` (None: the predictor's). Returns the overlay path."""
    import cv2
    from tqdm import tqdm

    from cpm_d2.engine import AVSPredictor
    from cpm_d2.utils.visualization import side_by_side
    from detectron2.data import Metadata

    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.WEIGHTS = weights
    cfg.freeze()
    names = metadata.get("stuff_classes", None) if metadata is not None else None
    predictor = AVSPredictor(cfg, allow_partial_weights=allow_partial_weights, batch_size=batch_size, class_names=names)
    if names is None:
        metadata = Metadata(stuff_classes=list(predictor.class_names))
    os.makedirs(output, exist_ok=True)
    video = OverlayVideo(os.path.join(output, "overlay.mp4"), source.fps, source.wave, source.sample_rate)
    try:
        predictions = predictor.iter_timed_frames(source.frames(), source.wave, source.sample_rate)
        for pred in tqdm(predictions, total=source.num_frames, desc="segmenting", unit="frame", disable=not progress):
            panel = side_by_side(pred["image"], pred["labels"].numpy(), None, metadata)
            video.add(panel)
            if save_frames:
                cv2.imwrite(os.path.join(output, f"frame_{pred['frame_index']:05d}.png"), panel[:, :, ::-1])
        return video.close()
    except BaseException:
        video.abort()
        raise


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--input", "--video", dest="input", required=True,
                        help="a video file with an audio track, a folder of frames (with --audio), or an AVS clip "
                             "folder (frames/ + audio.wav)")
    parser.add_argument("--audio", default=None, help="the wav of a folder of frames (or instead of a clip's audio.wav)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--dataset", default=None, help="registered dataset whose class names to show "
                        "(default: the config's first test dataset)")
    parser.add_argument("--max-frames", type=int, default=None)
    parser.add_argument("--fps", type=float, default=None,
                        help="video: segment this many frames per second; frames: their rate (default: spread "
                             "over the wav's length)")
    parser.add_argument("--save-frames", action="store_true", help="also write one PNG per frame")
    parser.add_argument("--batch-size", type=int, default=4, help="frames per forward pass")
    parser.add_argument("--allow-partial-weights", action="store_true",
                        help="use a checkpoint that does not cover the model exactly (not recommended)")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                        help="modify config options with KEY VALUE pairs (last on the command line)")
    return parser


def main(argv=None):
    parser = get_parser()
    args = parser.parse_args(argv)

    from cpm_d2.data import register_avs_datasets_from_cfg
    from cpm_d2.data.audio import AudioReadError
    from cpm_d2.engine import setup_cpm_logger
    from cpm_d2.engine.av_input import open_av_input
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if len(args.opts) % 2:
        parser.error(f"--opts takes KEY VALUE pairs, got an odd number of items: {' '.join(args.opts)}")
    setup_cpm_logger(detectron2=True)
    cfg = setup_cfg(args.config_file, args.opts)
    register_avs_datasets_from_cfg(cfg)
    dataset = args.dataset or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None)
    if dataset is not None and dataset not in DatasetCatalog.list():
        parser.error(f"--dataset {dataset} is not a registered dataset (register it with DATASETS.AVS_REGISTER)")
    if not os.path.isfile(args.weights):
        parser.error(f"--weights {args.weights}: no such file")
    try:  # before the model is built: a bad input costs nothing and writes nothing
        source = open_av_input(args.input, args.audio, fps=args.fps, max_frames=args.max_frames)
    except (OSError, ValueError, AudioReadError) as e:
        parser.error(str(e))
    metadata = MetadataCatalog.get(dataset) if dataset else None
    path = run(cfg, args.weights, source, args.output, metadata, save_frames=args.save_frames,
               allow_partial_weights=args.allow_partial_weights, batch_size=args.batch_size)
    print(f"wrote {path} ({source.kind} {source.path}, sound from {source.audio_path})")
    return path


if __name__ == "__main__":
    main()
