"""All config keys cpm_d2 adds to detectron2's defaults, in one function.

Usage (detectron2 convention)::

    from detectron2.config import get_cfg
    from cpm_d2 import add_cpm_config
    cfg = get_cfg()
    add_cpm_config(cfg)
    cfg.merge_from_file("configs/avss_r50.yaml")
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_cpm_config", "setup_cfg"]


def setup_cfg(config_file, opts=(), freeze=True):
    """detectron2's defaults + :func:`add_cpm_config`, then ``config_file`` and ``KEY VALUE`` opts."""
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_cpm_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    if freeze:
        cfg.freeze()
    return cfg


def add_cpm_config(cfg):
    """Add the keys of the CPM model, the audio front end, the AVS data and the solver."""
    _C = cfg
    # ------------------------------------------------------------------ input / data
    _C.INPUT.FORMAT = "RGB"
    # Mapper name; "avs_semantic" is the AVSDatasetMapper.
    _C.INPUT.DATASET_MAPPER_NAME = "avs_semantic"
    # Train geometry: "resize_crop" = resize short edge (MIN_SIZE_TRAIN) + random crop (CROP.*),
    # "random_resized_crop" = crop a random area/aspect then resize to CROP.SIZE,
    # "fixed" = resize to FIXED_SIZE ignoring aspect (AVSBench's 224x224 protocol).
    _C.INPUT.TRAIN_RESIZE_MODE = "resize_crop"
    # (H, W) for TRAIN_RESIZE_MODE/TEST_RESIZE_MODE "fixed".
    _C.INPUT.FIXED_SIZE = (224, 224)
    # Test geometry: "short_edge" (MIN_SIZE_TEST / MAX_SIZE_TEST) or "fixed" (FIXED_SIZE).
    _C.INPUT.TEST_RESIZE_MODE = "short_edge"
    # Area range for random_resized_crop.
    _C.INPUT.RRC_SCALE = (0.5, 1.0)
    # Pad images to a multiple of this in the model (-1: use the backbone's size_divisibility).
    _C.INPUT.SIZE_DIVISIBILITY = -1

    _C.INPUT.AUDIO = CN()
    _C.INPUT.AUDIO.SAMPLE_RATE = 16000  # everything is resampled to this rate (Hz)
    # Seconds of audio paired with each labelled frame (1 s for AVSBench, 3 s for VPO/CAVP).
    _C.INPUT.AUDIO.WINDOW_SECONDS = 1.0
    _C.INPUT.AUDIO.CHANNELS = 1  # 1 = mono (channels averaged), 2 = stereo (VPO)
    # Backbone input: "log_stft" (log-magnitude STFT) or "log_mel" (CAVP recipe).
    _C.INPUT.AUDIO.FEATURE = "log_stft"
    _C.INPUT.AUDIO.N_FFT = 512
    _C.INPUT.AUDIO.WIN_LENGTH = 400
    _C.INPUT.AUDIO.HOP_LENGTH = 160  # log_stft hop (10 ms at 16 kHz)
    _C.INPUT.AUDIO.N_MELS = 64
    _C.INPUT.AUDIO.F_MIN = 125.0
    _C.INPUT.AUDIO.F_MAX = 3800.0
    _C.INPUT.AUDIO.MEL_FRAMES_PER_SECOND = 96  # log_mel hop = SAMPLE_RATE / this
    _C.INPUT.AUDIO.LOG_OFFSET = 1e-6  # log(mag + offset)
    # Off-screen noise for ACP: "dataset" (audio of another training clip, preferably with no
    # shared class), "folder" (random wav from NOISE_DIR) or "none".
    _C.INPUT.AUDIO.NOISE_SOURCE = "dataset"
    _C.INPUT.AUDIO.NOISE_DIR = ""
    # Test-time ablation: replace every audio window by silence (shows how much the model uses
    # the sound; `tools/train_net.py --eval-only ... INPUT.AUDIO.MUTE True`).
    _C.INPUT.AUDIO.MUTE = False

    # Register AVS datasets in the AVSS layout from the config, no Python needed:
    # a list of [name, root, split] triples; class names come from <root>/label2idx.json.
    _C.DATASETS.AVS_REGISTER = []

    # ------------------------------------------------------------------ model: visual side
    _C.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoder"
    _C.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    _C.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 71  # C, background included (AVSS: 71)
    _C.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 255
    _C.MODEL.SEM_SEG_HEAD.CONVS_DIM = 256
    _C.MODEL.SEM_SEG_HEAD.MASK_DIM = 256
    _C.MODEL.SEM_SEG_HEAD.NORM = "GN"
    _C.MODEL.SEM_SEG_HEAD.COMMON_STRIDE = 4
    # Deformable-attention encoder of the pixel decoder.
    _C.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    _C.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = 6
    _C.MODEL.SEM_SEG_HEAD.DEFORMABLE_N_POINTS = 4

    # ------------------------------------------------------------------ model: decoders, losses
    _C.MODEL.MASK_FORMER = CN()
    _C.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = "AudioVisualTransformerDecoder"
    _C.MODEL.MASK_FORMER.CLASS_PREDICTOR = "LinearClassPredictor"  # or "GMMClassPredictor" (CCDM)
    _C.MODEL.MASK_FORMER.HIDDEN_DIM = 256  # D_q
    _C.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES = 100  # N class-agnostic queries
    _C.MODEL.MASK_FORMER.NHEADS = 8
    _C.MODEL.MASK_FORMER.DROPOUT = 0.0
    _C.MODEL.MASK_FORMER.DIM_FEEDFORWARD = 2048
    _C.MODEL.MASK_FORMER.DEC_LAYERS = 9  # visual masked-attention decoder layers
    _C.MODEL.MASK_FORMER.AUDIO_DEC_LAYERS = 3  # audio decoder layers (run before the visual ones)
    _C.MODEL.MASK_FORMER.PRE_NORM = False
    _C.MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ = False
    _C.MODEL.MASK_FORMER.SIZE_DIVISIBILITY = 32
    _C.MODEL.MASK_FORMER.DEEP_SUPERVISION = True  # aux losses at every decoder layer
    _C.MODEL.MASK_FORMER.NO_OBJECT_WEIGHT = 0.1
    _C.MODEL.MASK_FORMER.CLASS_WEIGHT = 2.0
    _C.MODEL.MASK_FORMER.MASK_WEIGHT = 5.0  # focal (or sigmoid-CE, see MASK_LOSS) on masks
    _C.MODEL.MASK_FORMER.DICE_WEIGHT = 5.0
    _C.MODEL.MASK_FORMER.MASK_LOSS = "focal"  # "focal" or "bce"
    _C.MODEL.MASK_FORMER.FOCAL_ALPHA = 0.25
    _C.MODEL.MASK_FORMER.FOCAL_GAMMA = 2.0
    # Point sampling for the matcher and mask losses (Mask2Former / PointRend).
    _C.MODEL.MASK_FORMER.TRAIN_NUM_POINTS = 112 * 112
    _C.MODEL.MASK_FORMER.OVERSAMPLE_RATIO = 3.0
    _C.MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO = 0.75
    _C.MODEL.MASK_FORMER.TEST = CN()
    _C.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = True

    # ------------------------------------------------------------------ model: audio side
    _C.MODEL.AUDIO = CN()
    _C.MODEL.AUDIO.BACKBONE_NAME = "AudioResNet"
    _C.MODEL.AUDIO.DEPTH = 18  # 18 or 34 (BasicBlock ResNet over the spectrogram)
    _C.MODEL.AUDIO.IN_CHANNELS = 1  # must equal INPUT.AUDIO.CHANNELS
    _C.MODEL.AUDIO.BASE_CHANNELS = 64  # width of the stem; stages use 1x, 2x, 4x, 8x
    _C.MODEL.AUDIO.NORM = "BN"
    _C.MODEL.AUDIO.PIXEL_DECODER_DIM = 256  # channels of the dense audio map u~_a
    _C.MODEL.AUDIO.WEIGHTS = ""  # optional pretrained audio backbone (.pth / .pkl)

    # ------------------------------------------------------------------ CPM
    _C.MODEL.CPM = CN()
    _C.MODEL.CPM.ENABLED = False  # False: class-agnostic baseline only
    _C.MODEL.CPM.LAMBDA = 1.0  # l = l_agn + LAMBDA * (w_ACP l_ACP + w_VCP l_VCP + w_PCL l_PCL)
    _C.MODEL.CPM.ACP = CN({"ENABLED": True, "WEIGHT": 1.0})
    _C.MODEL.CPM.VCP = CN({"ENABLED": True, "WEIGHT": 1.0})
    _C.MODEL.CPM.PCL = CN()
    _C.MODEL.CPM.PCL.ENABLED = True
    _C.MODEL.CPM.PCL.WEIGHT = 1.0
    _C.MODEL.CPM.PCL.TEMPERATURE = 0.1  # tau of eq. 9
    _C.MODEL.CPM.PCL.NUM_PIXELS = 1024  # pixels of u_v sampled per image (bounds memory)
    _C.MODEL.CPM.GMM = CN()
    _C.MODEL.CPM.GMM.NUM_COMPONENTS = 3  # M (paper Table 5: 3 is best)
    _C.MODEL.CPM.GMM.COVARIANCE = "diag"  # "diag" or "full"
    _C.MODEL.CPM.GMM.MEMORY_SIZE = 512  # matched embeddings kept per class
    _C.MODEL.CPM.GMM.UPDATE_INTERVAL = 10  # run EM every this many iterations
    _C.MODEL.CPM.GMM.EM_ITERS = 3
    _C.MODEL.CPM.GMM.MOMENTUM = 0.9  # new = MOMENTUM * old + (1 - MOMENTUM) * EM estimate
    _C.MODEL.CPM.GMM.EPS = 1e-4  # variance floor
    # Logits given to the CE loss: "per_dim" = log p(q|c) / D (a tempered posterior with the
    # same argmax; keeps CE finite in D = 256), "none" = log p(q|c) exactly as eq. 1.
    _C.MODEL.CPM.GMM.LOGIT_NORM = "per_dim"

    # ------------------------------------------------------------------ solver
    _C.SOLVER.OPTIMIZER = "ADAMW"
    _C.SOLVER.BACKBONE_MULTIPLIER = 0.1  # lr multiplier of the visual and audio backbones
    _C.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    _C.SOLVER.POLY_LR_POWER = 0.9
    _C.SOLVER.POLY_LR_CONSTANT_ENDING = 0.0
    _C.SOLVER.LR_SCHEDULER_NAME = "WarmupPolyLR"
    # Clip the gradient norm of the whole model (Mask2Former's "full_model").
    _C.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    _C.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.01
    _C.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0
    _C.SOLVER.AMP.ENABLED = False  # honoured only when CUDA is present

    # ------------------------------------------------------------------ evaluation
    _C.TEST.AVS = CN()
    # Extra result blocks for named subsets: list of [subset_name, dataset-dict key, value].
    _C.TEST.AVS.SUBSETS = []
    _C.TEST.AVS.SAVE_BEST_METRIC = "sem_seg/mIoU"  # the best checkpoint is kept by this metric
    _C.TEST.AVS.STS_PERIOD = 0  # >0: log the matching-stability score every this many iters
    return cfg
