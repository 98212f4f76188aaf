"""Overlay pictures of AVS predictions: frame | prediction | ground truth, with class names."""
import numpy as np

from detectron2.data import Metadata
from detectron2.utils.colormap import colormap
from detectron2.utils.visualizer import ColorMode, Visualizer

__all__ = ["overlay_sem_seg", "side_by_side", "predicted_labels"]


def predicted_labels(sem_seg_scores, is_binary=False):
    """C x H x W scores (torch or numpy) -> H x W int label map (argmax; binary: fg prob > 0.5)."""
    scores = np.asarray(sem_seg_scores.detach().cpu() if hasattr(sem_seg_scores, "detach") else sem_seg_scores)
    if is_binary:
        total = scores[0] + scores[1]
        prob = np.divide(scores[1], total, out=np.zeros_like(total), where=total > 0)
        return (prob > 0.5).astype(np.int64)
    return scores.argmax(axis=0).astype(np.int64)


def overlay_sem_seg(image_rgb, label_map, metadata, ignore_label=255):
    """Draw ``label_map`` (H x W ints) over ``image_rgb`` (H x W x 3 uint8) with class names.

    Background (class 0) and ``ignore_label`` pixels are left undrawn so only sounding objects
    are coloured.
    """
    labels = np.asarray(label_map).copy()
    labels[labels == ignore_label] = 0
    # Draw only foreground classes: detectron2 skips labels absent from the map, so point
    # background at an id that draw_sem_seg never sees.
    vis = Visualizer(np.asarray(image_rgb), metadata=_with_colors(metadata), scale=1.0, instance_mode=ColorMode.IMAGE)
    masked = labels.astype(np.int64)
    masked[labels == 0] = len(metadata.stuff_classes) + 1
    out = vis.draw_sem_seg(masked, area_threshold=0, alpha=0.55)
    return out.get_image()


def _with_colors(metadata):
    """Metadata with deterministic ``stuff_colors`` (detectron2 would pick random ones)."""
    if metadata.get("stuff_colors", None):
        return metadata
    palette = colormap(rgb=True, maximum=255).astype(int).tolist()
    colors = [palette[(i + 7) % len(palette)] for i in range(len(metadata.stuff_classes))]
    return Metadata(stuff_classes=list(metadata.stuff_classes), stuff_colors=colors)


def _title(panel, text):
    import cv2

    header = np.full((18, panel.shape[1], 3), 255, dtype=np.uint8)
    cv2.putText(header, text, (3, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([header, panel], axis=0)


def side_by_side(image_rgb, pred_labels, gt_labels, metadata, scale=1):
    """Frame | prediction overlay | ground-truth overlay, each titled; returns H' x W' x 3 uint8.

    ``scale`` enlarges the frame and the label maps (nearest neighbour) *before* drawing, so
    class names stay legible on small frames.
    """
    import cv2

    def up(x, interp):
        x = np.asarray(x)
        if scale == 1:
            return x
        return cv2.resize(x, (x.shape[1] * scale, x.shape[0] * scale), interpolation=interp)

    image = up(np.asarray(image_rgb, dtype=np.uint8), cv2.INTER_NEAREST)
    panels = [image, overlay_sem_seg(image, up(pred_labels.astype(np.uint8), cv2.INTER_NEAREST), metadata)]
    titles = ["frame", "prediction"]
    if gt_labels is not None:
        panels.append(overlay_sem_seg(image, up(np.asarray(gt_labels).astype(np.uint8), cv2.INTER_NEAREST), metadata))
        titles.append("ground truth")
    panels = [_title(p, t) for p, t in zip(panels, titles)]
    gap = np.full((panels[0].shape[0], 4, 3), 255, dtype=np.uint8)
    row = [panels[0]]
    for p in panels[1:]:
        row += [gap, p]
    return np.concatenate(row, axis=1)


def write_dataset_overlays(model, data_loader, metadata, out_dir, max_frames=16, scale=4):
    """Run ``model`` (eval mode) over ``data_loader`` and write one side-by-side PNG per frame.

    Returns the list of written paths. Ground truth comes from each input's ``sem_seg_file_name``.
    """
    import os

    import cv2
    import torch
    from PIL import Image

    from cpm_d2.data.file_io import read_label_map

    os.makedirs(out_dir, exist_ok=True)
    is_binary = bool(metadata.get("is_binary", False))
    paths = []
    model.eval()
    with torch.no_grad():
        for inputs in data_loader:
            outputs = model(inputs)
            for inp, out in zip(inputs, outputs):
                image = np.asarray(Image.open(inp["file_name"]).convert("RGB"))
                gt = None
                if inp.get("sem_seg_file_name"):
                    gt = read_label_map(inp["sem_seg_file_name"]).astype(np.int64)
                pred = predicted_labels(out["sem_seg"], is_binary=is_binary)
                panel = side_by_side(image, pred, gt, metadata, scale=scale)
                name = f"{inp.get('clip_id', 'clip')}_{inp.get('frame_index', len(paths))}.png"
                path = os.path.join(out_dir, name.replace(os.sep, "_"))
                cv2.imwrite(path, panel[:, :, ::-1])
                paths.append(path)
                if len(paths) >= max_frames:
                    return paths
    return paths


def grid(images, columns=2, pad=6):
    """Tile equally sized H x W x 3 images into one picture (for the README)."""
    h, w = images[0].shape[:2]
    rows = (len(images) + columns - 1) // columns
    canvas = np.full((rows * (h + pad) - pad, columns * (w + pad) - pad, 3), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = img
    return canvas
