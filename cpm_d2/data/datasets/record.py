"""The dataset dict of one labelled frame: the one place that defines its keys.

Every AVS loader (AVSS layout, AVSBench-Objects, VPO; the synthetic sets use the AVSS layout)
returns a list of :func:`frame_record` dicts; :class:`~cpm_d2.data.AVSDatasetMapper` reads
:data:`MAPPER_KEYS` of them.

    file_name           frame image path
    sem_seg_file_name   index-PNG label map path (0 = background, 255 = ignore)
    audio_file_name     the clip's wav
    audio_start         seconds: start of the frame's audio window in the wav
    audio_duration      seconds: length of that window (INPUT.AUDIO.WINDOW_SECONDS)
    frame_index         index of the frame in its clip
    num_frames          frames in the clip
    clip_id             unique id of the clip (frames of a clip share it)
    height, width       frame size in pixels
    subset              dataset subset (e.g. "v1s", "s4", "vpo_ss")
plus loader-specific extras (e.g. ``multi_source`` for AVSS subsets).
"""

__all__ = ["frame_record", "RECORD_KEYS", "MAPPER_KEYS"]

RECORD_KEYS = ("file_name", "sem_seg_file_name", "audio_file_name", "audio_start", "audio_duration", "frame_index",
               "num_frames", "clip_id", "height", "width", "subset")
MAPPER_KEYS = ("file_name", "sem_seg_file_name", "audio_file_name", "audio_start", "audio_duration")


def frame_record(*, file_name, sem_seg_file_name, audio_file_name, audio_start, audio_duration, frame_index,
                 num_frames, clip_id, height, width, subset, **extra):
    """A dataset dict with every key of :data:`RECORD_KEYS` (numbers as float / int) and ``extra``."""
    record = {
        "file_name": file_name,
        "sem_seg_file_name": sem_seg_file_name,
        "audio_file_name": audio_file_name,
        "audio_start": float(audio_start),
        "audio_duration": float(audio_duration),
        "frame_index": int(frame_index),
        "num_frames": int(num_frames),
        "clip_id": clip_id,
        "height": int(height),
        "width": int(width),
        "subset": subset,
    }
    record.update(extra)
    return record
