"""Every loss of the project as a pure, jittable function of arrays.

`losses.<name>` is the one public access path:
  contrastive.py  NT-Xent (whole batch and sharded), masked cross-entropy
  family.py       SupCon, MoCo v2/v3, BYOL, Sinkhorn/SwAV, InstDisc, HCL,
                  InvaSpread
  metric.py       batch-hard triplet and pairwise margin losses
  alignment.py    domain adaptation: gradient reversal, CORAL, MK-MMD
  normalize.py    the one l2_normalize
"""

from simclr_jax.losses import alignment
from simclr_jax.losses.contrastive import ContrastiveStats
from simclr_jax.losses.contrastive import finalize
from simclr_jax.losses.contrastive import masked_cross_entropy
from simclr_jax.losses.contrastive import nt_xent
from simclr_jax.losses.contrastive import nt_xent_local
from simclr_jax.losses.contrastive import nt_xent_with_stats
from simclr_jax.losses.contrastive import sharded_nt_xent
from simclr_jax.losses.family import byol
from simclr_jax.losses.family import hard_negative_nt_xent
from simclr_jax.losses.family import instdisc_nce
from simclr_jax.losses.family import instdisc_softmax
from simclr_jax.losses.family import invaspread
from simclr_jax.losses.family import memory_bank_update
from simclr_jax.losses.family import moco_infonce
from simclr_jax.losses.family import moco_v3
from simclr_jax.losses.family import sinkhorn
from simclr_jax.losses.family import supcon
from simclr_jax.losses.family import swav
from simclr_jax.losses.metric import contrastive_margin
from simclr_jax.losses.metric import triplet_margin
from simclr_jax.losses.normalize import l2_normalize
