"""Every default hyper-parameter of reid-ext's losses, recipes and re-ranking, written once.

The functions (reid_ext.ops), their plain-PyTorch references (reid_ext.reference), the
nn.Module losses, the loss recipes and the trainer all take their defaults from here.
"""

# Unified batch-all triplet loss (UBAT): scale and margin on the cosine similarity.
UNIFIED_GAMMA = 64.0
UNIFIED_MARGIN = 0.25

# Batch-hard triplet loss (Hermans et al.); the MGN recipe uses MGN's own margin below.
BATCH_HARD_MARGIN = 0.3
BATCH_HARD_METRIC = "euclidean"



def hetero_center_margin(mining: str) -> float:
    """The hetero-center triplet loss's margin for ``mining``: that of the loss it reduces to (batch-hard
    over the raw centers for "hard", unified batch-all over the normalized ones otherwise; an unknown
    mining is the op's check to name)."""
    return BATCH_HARD_MARGIN if mining == "hard" else UNIFIED_MARGIN


# Cosine softmax (CosFace): scale and additive margin on the target cosine.
COSINE_SOFTMAX_SCALE = 64.0
COSINE_SOFTMAX_MARGIN = 0.35

# Classifier weights (SoftmaxLoss, CosineSoftmaxLoss) start as N(0, std^2) rows: small random
# directions start every class near cosine 0 with each sample.
CLASSIFIER_INIT_STD = 0.001

# The norm clamp of every normalization: x / max(|x|, eps).
NORM_EPS = 1e-12

# The MGN recipe (Wang et al. 2018): batch-hard triplet margin on the reduced global features.
MGN_TRIPLET_MARGIN = 1.2

# The UBAT recipe's cosine softmax: CosFace's 64 and 0.35 leave low-dimensional features
# trained from scratch stuck at the loss s * m + log C; 16 and 0.2 train.
UBAT_COS_SCALE = 16.0
UBAT_COS_MARGIN = 0.2

# k-reciprocal re-ranking (Zhong et al. 2017).
RERANK_K1 = 20
RERANK_K2 = 6
RERANK_LAMBDA = 0.3
