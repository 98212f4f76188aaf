"""The config keys cpm_d2 adds to detectron2's defaults, one function per concern.

* :func:`add_maskformer_config`: Mask2Former's keys, with Mask2Former's meanings (a YAML written
  for Mask2Former means the same here), plus the class-head registry key;
* :func:`add_avs_config`: audio-visual segmentation: audio input and front end, audio model,
  dataset registration, AVS evaluation, input geometry;
* :func:`add_cpm_config`: ``MODEL.CPM.*`` only (the CPM training method).

Every key detectron2 defines keeps detectron2's default (``INPUT.FORMAT``,
``SOLVER.LR_SCHEDULER_NAME``, ``MODEL.SEM_SEG_HEAD.NUM_CLASSES``, ...). The AVS recipe's values of
those keys are set in ``configs/Base-AVS.yaml``, which every shipped config inherits.

Usage (detectron2 convention)::

    from detectron2.config import get_cfg
    from cpm_d2 import add_maskformer_config, add_avs_config, add_cpm_config
    cfg = get_cfg()
    add_maskformer_config(cfg); add_avs_config(cfg); add_cpm_config(cfg)
    cfg.merge_from_file("configs/avss_r50.yaml")

or ``cpm_d2.config.get_cfg()``, which does the same. Keys renamed or removed since 0.1 are
listed in ``docs/architecture.md`` ("Config keys").
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_maskformer_config", "add_avs_config", "add_cpm_config", "get_cfg", "setup_cfg"]


def get_cfg():
    """detectron2's defaults + the three ``add_*_config`` functions of this module."""
    from detectron2.config import get_cfg as d2_get_cfg

    cfg = d2_get_cfg()
    add_maskformer_config(cfg)
    add_avs_config(cfg)
    add_cpm_config(cfg)
    return cfg


def setup_cfg(config_file, opts=(), freeze=True):
    """:func:`get_cfg`, then ``config_file`` and ``KEY VALUE`` opts."""
    cfg = get_cfg()
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    if freeze:
        cfg.freeze()
    return cfg


def add_maskformer_config(cfg):
    """Mask2Former's keys (same names, same meanings) and the solver keys of its recipe."""
    _C = cfg
    # Training images (and label maps, with the ignore value) are padded on the bottom/right to a
    # multiple of this in the mapper; -1: no padding (Mask2Former's semantic mapper).
    _C.INPUT.SIZE_DIVISIBILITY = -1

    _C.SOLVER.OPTIMIZER = "ADAMW"
    _C.SOLVER.BACKBONE_MULTIPLIER = 0.1  # lr multiplier of the backbones (visual and audio here)
    _C.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    _C.SOLVER.POLY_LR_POWER = 0.9
    _C.SOLVER.POLY_LR_CONSTANT_ENDING = 0.0
    _C.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0
    _C.SOLVER.AMP.ENABLED = False  # honoured only when CUDA is present

    head = _C.MODEL.SEM_SEG_HEAD
    head.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoder"
    head.IGNORE_VALUE = 255
    head.MASK_DIM = 256
    head.NORM = "GN"
    # Stride of the mask features: input features finer than this are not used.
    head.COMMON_STRIDE = 4
    head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    head.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS = 4
    head.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 8
    head.TRANSFORMER_ENC_LAYERS = 6

    mf = _C.MODEL.MASK_FORMER = CN()
    mf.TRANSFORMER_DECODER_NAME = "AudioVisualTransformerDecoder"
    mf.HIDDEN_DIM = 256  # D_q
    mf.NUM_OBJECT_QUERIES = 100  # N class-agnostic queries
    mf.NHEADS = 8
    mf.DROPOUT = 0.0
    mf.DIM_FEEDFORWARD = 2048
    # Predictions of the query decoder, as in Mask2Former: the first comes before the first
    # masked-attention layer, so DEC_LAYERS - 1 masked-attention layers are built (10 -> 9).
    mf.DEC_LAYERS = 10
    mf.PRE_NORM = False
    mf.ENFORCE_INPUT_PROJ = False
    mf.SIZE_DIVISIBILITY = 32  # the model pads images to this; <= 0: the backbone's size_divisibility
    mf.DEEP_SUPERVISION = True  # losses on every prediction, not only the last
    mf.NO_OBJECT_WEIGHT = 0.1
    mf.CLASS_WEIGHT = 2.0
    mf.MASK_WEIGHT = 5.0  # weight of the per-point mask loss (MASK_LOSS)
    mf.DICE_WEIGHT = 5.0
    # Point sampling for the matcher and the mask losses (Mask2Former / PointRend).
    mf.TRAIN_NUM_POINTS = 112 * 112
    mf.OVERSAMPLE_RATIO = 3.0
    mf.IMPORTANCE_SAMPLE_RATIO = 0.75
    # cpm_d2 additions to the Mask2Former recipe:
    # the query classifier, built by name from CLASS_PREDICTOR_REGISTRY ("GMMClassPredictor" = CCDM)
    mf.CLASS_PREDICTOR = "LinearClassPredictor"
    mf.MASK_LOSS = "focal"  # "focal" (the CPM paper) or "bce" (Mask2Former)
    mf.FOCAL_ALPHA = 0.25
    mf.FOCAL_GAMMA = 2.0
    mf.TEST = CN()
    # How query classes and masks become a semantic map: "argmax_query" (CPM §3.1: per pixel the
    # class of the query i with c_i != no-object maximising p_i(c_i) * m_i) or "soft_sum"
    # (Mask2Former: argmax_c sum_i p_i(c) * m_i).
    mf.TEST.SEMANTIC_INFERENCE = "argmax_query"
    _add_gmm_head_keys(mf)
    for old, new in _RENAMED_NODES.items():  # an old YAML or KEY VALUE gets yacs's "was renamed" error
        for key in [""] + ["." + k for k in cfg.MODEL.MASK_FORMER.GMM]:
            if not cfg.key_is_renamed(old + key):
                cfg.register_renamed_key(old + key, new + key, "see docs/architecture.md, 'Config keys'")
    return cfg


# Keys that moved: the GMM keys apply wherever per-class mixtures are built (the GMM class head,
# also without CPM, and the softmax head's MODEL.CPM.LINEAR_HEAD_PROMPTS "gmm"), not only under CPM.
_RENAMED_NODES = {"MODEL.CPM.GMM": "MODEL.MASK_FORMER.GMM"}


def _add_gmm_head_keys(mf):
    """``MODEL.MASK_FORMER.GMM``: CCDM's per-class Gaussian mixtures (GMMClassPredictor, and the
    prompts of MODEL.CPM.LINEAR_HEAD_PROMPTS "gmm"); docs/architecture.md draws how they are fed."""
    g = mf.GMM = CN()
    g.NUM_COMPONENTS = 3  # M Gaussians per class
    # "diag" (a diagonal covariance per component), "tied" (one diagonal covariance per class, shared by
    # its components) or "full"
    g.COVARIANCE = "diag"
    # --- the memory bank each class's mixture is fitted to
    g.MEMORY_SIZE = 512  # entries kept per class (ring buffer, newest kept)
    g.MAX_AGE = 0  # > 0: EM ignores bank entries older than this many iterations
    # Matched embeddings the bank receives: "last" (the final prediction's) or "all" (every
    # prediction's: each query then enters once per decoder layer, as near copies).
    g.OBSERVE_LAYERS = "all"
    # True: bank a matched embedding only where the head's own prediction (argmax) is its assigned
    # class (GMMSeg keeps only correctly classified samples); False: every matched embedding.
    g.OBSERVE_CORRECT_ONLY = False
    # True (training with MODEL.CPM): the banks also receive the embeddings CPM's prompts decode to
    # (VCP's prompt group; with OBSERVE_LAYERS "all" every prediction's), labelled with the prompt's
    # class, beside the matched ones, so the mixtures that score the queries are fitted to the
    # prompted queries too. False: matched class-agnostic queries only (the paper's set F).
    g.OBSERVE_PROMPTS = False
    # True: every decoder prediction (each intermediate one and the final one) has its own class
    # mixtures, fitted to that prediction's matched embeddings and scoring that prediction's queries;
    # prompts come from the final prediction's. False: one set of mixtures scores every prediction.
    # True needs OBSERVE_LAYERS "all".
    g.PER_PREDICTION = False
    # --- EM
    g.UPDATE_INTERVAL = 10  # run EM every this many iterations
    g.EM_ITERS = 3  # EM iterations per update
    g.MOMENTUM = 0.5  # new = MOMENTUM * old + (1 - MOMENTUM) * EM estimate
    # Variance floor, on the scale of the modelled embeddings (with NORMALIZE: unit vectors, whose
    # coordinates have variance about 1 / HIDDEN_DIM, so 1e-2 is 0.64 / HIDDEN_DIM at HIDDEN_DIM 64
    # and 2.56 / HIDDEN_DIM at 256; without NORMALIZE raw embeddings, where 1e-4 suits). A higher
    # floor gives broader components: smoother class scores and wider prompt draws.
    g.EPS = 1e-2
    # > 0: each class's variance floor in EM is max(EPS, EPS_CLASS_RELATIVE * that class's bank
    # variance per coordinate, averaged over the coordinates), so the floor follows a class whose
    # embeddings are tighter than EPS (e.g. 0.25: a component may be as narrow as a quarter of its
    # class's variance). 0 = EPS for every class. Class scores and prompt draws use the fitted
    # covariances, raised to SCORE_EPS / PROMPT_EPS where those are set.
    g.EPS_CLASS_RELATIVE = 0.0
    # Variance floor of the Gaussians that prompts are drawn from, on EPS's scale: each diagonal
    # variance is raised to at least PROMPT_EPS when sampling, scores and EM are unchanged. 0 = draw
    # from the fitted covariances as they are. Lets prompt draws be wide while the components that
    # score and keep the class's modes stay narrow (diag / tied covariances only).
    g.PROMPT_EPS = 0.0
    # Spread of the prompt draws around their component's mean, as a multiple of the Gaussian's
    # standard deviations: 1 = draws from the fitted Gaussian (eq. 2), 0 = the component's mean
    # itself (one point per component), in between a narrower draw. Scores and EM are unchanged.
    g.PROMPT_SCALE = 1.0
    # What the prompts are after the draw (GMMClassPredictor): "none" = the draws themselves (eq. 2),
    # "linear" = A z + b, one learned affine map shared by the classes (starts at the identity),
    # "class_offset" = z + o_k, one learned vector per class (starts at zero). Both start by giving
    # the draws and are trained by the prompting losses only; scores and EM are unchanged.
    g.PROMPT_ADAPTER = "none"
    # Variance floor of the components when they score queries (the class logits), on EPS's scale:
    # each diagonal variance is raised to at least SCORE_EPS there, EM and prompt draws are
    # unchanged. 0 = score with the fitted covariances. Lets the class scores be smooth while the
    # components stay narrow enough to keep the class's modes (diag / tied covariances only).
    g.SCORE_EPS = 0.0
    # True: each component's mean, where it scores queries (the class logits, in training and at
    # inference), is its EM mean plus a learned offset (one vector per component, starting at zero)
    # that the class losses train; EM and prompt draws keep the EM means. False: the EM means.
    g.LEARNED_MEAN_OFFSETS = False
    # A class is first fitted (and prompted from) once its bank holds this many distinct entries per
    # component (copies of one query from several layers count once); until then it keeps its prior.
    g.MIN_ENTRIES_PER_COMPONENT = 4
    # Before each EM iteration a component whose mixing weight is below RESEED_BELOW / NUM_COMPONENTS
    # (a fraction of the uniform weight) is re-seeded; 0 = never (a component left without
    # responsibility then keeps its stale Gaussian).
    g.RESEED_BELOW = 0.4
    # How: "worst" (on the bank entry the class's mixture explains worst, with the class-wide
    # covariance) or "split" (the class's heaviest component is halved along its principal axis: the
    # new one starts inside the class's data).
    g.RESEED = "worst"
    # Responsibilities of the E-step: "posterior" (EM, eq. 3) or "sinkhorn" (balanced so that every
    # component takes an equal share of its class's bank: GMMSeg's guard against collapse).
    g.ESTEP = "posterior"
    # Prior on each component's mean in the M-step, centred on that component's random prior mean
    # (the prior means of different classes are nearly orthogonal): the means are MAP estimates
    # (sum of responsibility-weighted entries + MEAN_PRIOR_WEIGHT * prior mean) / (mass +
    # MEAN_PRIOR_WEIGHT), so the weight counts as that many bank entries; variances stay around the
    # data's own mean. Keeps the classes' means apart while their embeddings still lie together.
    # 0 = plain EM (maximum likelihood).
    g.MEAN_PRIOR_WEIGHT = 0.0
    # > 0: MEAN_PRIOR_WEIGHT decays linearly to 0 at this training iteration; 0 = it stays constant.
    g.MEAN_PRIOR_ITERS = 0
    # --- scoring (GMMClassPredictor)
    # True: L2-normalise the embeddings and keep the means on the unit sphere (GMMSeg); prompts are
    # rescaled to the class's mean embedding norm. False: model the embeddings as they are.
    g.NORMALIZE = True
    # A class's score from its components: "logsumexp" (log p(q|c), eq. 2) or "max" (the best
    # component, GMMSeg).
    g.COMPONENT_SCORE = "logsumexp"
    # Logits given to the losses: "sqrt_dim" = score / sqrt(D), "per_dim" = score / D, "learned" =
    # score / T with T learned (from sqrt(D)), "none" = the score exactly (eq. 1): these temperatures
    # apply in training only, inference uses eq. 1. "class_layer_norm" = a LayerNorm over the classes'
    # scores (GMMSeg), in training and inference.
    g.LOGIT_NORM = "sqrt_dim"
    # Class logits at inference: "posterior" (the scores exactly: eq. 1's posterior, which in high D
    # is nearly one-hot, so whether a query is kept rests on the no-object score alone) or
    # "tempered" (LOGIT_NORM's training temperature kept, so a query whose class is uncertain
    # spreads its probability over the classes, as a softmax head's does).
    g.TEST_LOGITS = "posterior"
    # How "no object" is scored: "objectness" (a learned logit o; p(no object) = sigmoid(o) and the
    # classes share 1 - sigmoid(o) by the GMM posterior), "softmax" (a learned logit z in one softmax
    # with the classes' training logits, as Mask2Former's no-object logit: p(no object) then also
    # depends on how close the query is to every class's mixture; at inference with TEST_LOGITS
    # "posterior" the classes share the rest by the GMM posterior) or "gmm" (a mixture fitted to the
    # unmatched queries' embeddings, like any class: the paper pads its classes with no-object).
    g.NO_OBJECT = "objectness"
    # Layers of the map from a query embedding to the learned no-object logit ("objectness" /
    # "softmax"): 1 = a linear map, n > 1 = an MLP of n layers (hidden width HIDDEN_DIM, ReLU).
    g.OBJECTNESS_LAYERS = 1


def add_avs_config(cfg):
    """Audio-visual segmentation: input geometry, audio front end, audio model, datasets, evaluation."""
    _C = cfg
    # Train geometry: "resize_crop" = resize short edge (MIN_SIZE_TRAIN) + random crop (CROP.*),
    # "random_resized_crop" = crop a random area/aspect then resize to CROP.SIZE,
    # "fixed" = resize to FIXED_SIZE ignoring aspect (AVSBench's 224x224 protocol).
    _C.INPUT.TRAIN_RESIZE_MODE = "resize_crop"
    _C.INPUT.FIXED_SIZE = (224, 224)  # (H, W) for TRAIN/TEST_RESIZE_MODE "fixed"
    # Test geometry: "short_edge" (MIN_SIZE_TEST / MAX_SIZE_TEST; MIN_SIZE_TEST 0 = original size)
    # or "fixed" (FIXED_SIZE).
    _C.INPUT.TEST_RESIZE_MODE = "short_edge"
    _C.INPUT.RRC_SCALE = (0.5, 1.0)  # area range of random_resized_crop

    a = _C.INPUT.AUDIO = CN()
    a.SAMPLE_RATE = 16000  # everything is resampled to this rate (Hz)
    # Seconds of audio paired with each labelled frame (1 s for AVSBench, 3 s for VPO/CAVP).
    a.WINDOW_SECONDS = 1.0
    a.CHANNELS = 1  # 1 = mono (channels averaged), 2 = stereo (VPO)
    # Time-frequency grid of the magnitude the mapper ships: "stft" (|STFT|) or "mel" (mel-filtered
    # |STFT|, the CAVP recipe). The model takes the log (MODEL.AUDIO.LOG_OFFSET).
    a.FEATURE = "stft"
    a.N_FFT = 512
    a.WIN_LENGTH = 400
    a.HOP_LENGTH = 160  # stft hop (10 ms at 16 kHz)
    a.N_MELS = 64
    a.F_MIN = 125.0
    a.F_MAX = 3800.0
    a.MEL_FRAMES_PER_SECOND = 96  # mel hop = SAMPLE_RATE / this
    # Off-screen noise D_r for CPM's ACP (read only when MODEL.CPM.ENABLED and MODEL.CPM.ACP.ENABLED):
    # "dataset" (audio of another training clip, preferably with no shared class), "folder" (a
    # random window of a random wav under NOISE_DIR) or "batch" (the next clip of the batch).
    a.NOISE_SOURCE = "dataset"
    a.NOISE_DIR = ""
    # Test-time ablation: every audio window is replaced by silence (how much does the model use
    # the sound? `tools/train_net.py --eval-only ... INPUT.AUDIO.MUTE True`).
    a.MUTE = False

    # Register AVS datasets in the AVSS layout from the config, no Python needed:
    # a list of [name, root, split] triples; class names come from <root>/label2idx.json.
    _C.DATASETS.AVS_REGISTER = []
    # A clip or labelled frame that metadata.csv lists (or the layout promises: AVSS v1m/v2 label 5/10
    # frames) but whose files are absent (clip folder, frame, wav, label map), or a listed clip with no
    # label map at all: False = loading stops with an error naming it; True = it is skipped, and the
    # loading summary each split logs (OUTPUT_DIR/log.txt) lists it by reason and name. Corrupt files
    # and bad metadata rows are errors either way (docs/datasets.md, "What loading checks").
    _C.DATASETS.ALLOW_INCOMPLETE = False

    m = _C.MODEL.AUDIO = CN()
    m.BACKBONE_NAME = "AudioResNet"
    m.DEPTH = 18  # 18 or 34 (BasicBlock ResNet over the spectrogram)
    m.IN_CHANNELS = 1  # must equal INPUT.AUDIO.CHANNELS
    m.BASE_CHANNELS = 64  # width of the stem; stages use 1x, 2x, 4x, 8x
    m.NORM = "BN"
    m.PIXEL_DECODER_DIM = 256  # channels of the dense audio map u~_a
    m.WEIGHTS = ""  # optional pretrained audio backbone (.pth / .pkl)
    m.LOG_OFFSET = 1e-6  # the model's input is log(magnitude + LOG_OFFSET)
    # Audio decoder layers: queries cross-attend the audio tokens before the visual decoder.
    _C.MODEL.MASK_FORMER.AUDIO_DEC_LAYERS = 3

    # ---------------- MODEL.AUDIO.STEREO_POSITION: stereo-aware decoding (docs/stereo.md) ----------------
    # The paper feeds stereo only to the audio backbone's 2-channel stem (position and semantics
    # encoded jointly). With this switch each query also estimates where its sound is from the
    # inter-channel level difference of the time-frequency bins its audio mask selects, and adds a
    # prior over image columns to its mask logits (and so to the masked attention); see
    # cpm_d2/modeling/transformer_decoder/stereo_position.py for the design and shapes.
    sp = m.STEREO_POSITION = CN()
    # False = the paper's model, parameter for parameter. True needs stereo audio (INPUT.AUDIO.CHANNELS 2
    # and MODEL.AUDIO.IN_CHANNELS 2): mono input (config or wav file) is an error.
    sp.ENABLED = False
    # Width sigma of the column prior, as a fraction of the frame width:
    # mask logit += -gain * ((column x - estimated source x) / WIDTH)^2. The gain is learned, so WIDTH
    # sets the prior's sharpness at initialisation (gain / WIDTH^2; docs/stereo.md compares widths).
    sp.WIDTH = 0.05
    # Gain of the prior at initialisation, the same for every query; afterwards each query's gain is
    # learned from its embedding (>= 0, so a query can switch the prior off, e.g. background).
    sp.INIT_GAIN = 0.5
    # What the audio backbone sees when the switch is on: "mid" = the channel mean in both of its input
    # channels (semantics cannot see position, which only the explicit cue above carries: the two are
    # encoded separately, and the audio side is exactly mirror-symmetric in the channels) or "stereo" =
    # both channels (the paper's 2-channel stem, position and semantics jointly, plus the cue above).
    # Off, the backbone always sees both channels (the paper).
    sp.BACKBONE_INPUT = "mid"
    # ---------------- end MODEL.AUDIO.STEREO_POSITION ----------------

    t = _C.TEST.AVS = CN()
    t.SUBSETS = []  # extra result blocks for named subsets: [[subset_name, dataset-dict key, value], ...]
    t.SAVE_BEST_METRIC = "sem_seg/mIoU"  # the best checkpoint is kept by this metric
    t.STS_PERIOD = 0  # > 0: log the matching-stability score every this many iterations
    # True: every evaluation also writes each frame's predicted label map (the evaluator's own label
    # rule) as an index PNG in the AVSS palette, laid out like the dataset:
    # <evaluator folder>/predictions/<clip>/<frame>.png (tools/train_net.py: OUTPUT_DIR/inference/
    # <dataset>/predictions/, beside avs_results.json); every process writes the frames it evaluated.
    t.SAVE_PREDICTIONS = False
    return cfg


def add_cpm_config(cfg):
    """``MODEL.CPM.*``: class-conditional prompting (paper §3.2); off = the plain audio-visual Mask2Former."""
    c = cfg.MODEL.CPM = CN()
    c.ENABLED = False  # False: class-agnostic training only (the baseline)
    # l = l_agn + LAMBDA * (w_ACP l_ACP + w_VCP l_VCP + w_PCL l_PCL). The paper does not give lambda;
    # 1 weighs the class-agnostic and the CPM terms equally. The w_* (WEIGHT keys below) are 1, the
    # paper's l_CPM = l_ACP + l_VCP + l_PCL.
    c.LAMBDA = 1.0
    # Prompts when the class head is LinearClassPredictor: "embedding" (a learnable vector per
    # class, the paper's "Point Rep."), "fixed_random" (a random N(0, 1) vector per class, never
    # trained) or "gmm" (samples of per-class mixtures fitted by EM, as CCDM's,
    # MODEL.MASK_FORMER.GMM, while the softmax still classifies).
    c.LINEAR_HEAD_PROMPTS = "embedding"
    # Prompts when the class head is GMMClassPredictor: "gmm" (draws of its class mixtures, the
    # paper's CCDM, "Dist Rep.") or "embedding" (a learnable vector per class, as Point Rep.'s,
    # while the mixtures still classify).
    c.GMM_HEAD_PROMPTS = "gmm"
    c.ACP = CN({"ENABLED": True, "WEIGHT": 1.0})
    c.VCP = CN({"ENABLED": True, "WEIGHT": 1.0})
    # Audio the VCP prompts are decoded with when ACP is on: "clean" (a prompt decode on a_i alone:
    # VCP's targets are the objects a_i makes sound) or "mixture" (the ACP pass's a_i + a_j, one
    # prompt decode for both). The paper runs VCP "simultaneously with ACP" and does not say which
    # (docs/results.md compares the two).
    c.VCP.AUDIO = "clean"
    # Multiplies VCP's class term (its CE, at every layer) on top of VCP.WEIGHT and
    # MODEL.MASK_FORMER.CLASS_WEIGHT; 0 = VCP supervises only the prompts' masks.
    c.VCP.CLASS_WEIGHT = 1.0
    c.PCL = CN()
    c.PCL.ENABLED = True
    c.PCL.WEIGHT = 1.0
    c.PCL.TEMPERATURE = 0.1  # tau of eq. 9 (not given in the paper; a common InfoNCE value)
    c.PCL.NUM_PIXELS = 1024  # pixels sampled per image (bounds memory)
    c.PCL.PROJ_DIM = 128  # PCL compares projections of the audio anchors and the pixel features
    # Negatives of an anchor: "image" (pixels of other classes in the anchor's own image) or
    # "batch" (of every image of the batch; a silent object of the anchor's class in another image
    # is then a negative). docs/results.md compares the two.
    c.PCL.NEGATIVES = "image"
    return cfg
