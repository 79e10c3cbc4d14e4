# %% [markdown]
# # Which inputs matter? Sparse variational dropout on a linear model
#
# A linear regression with 30 candidate features, of which only 5 carry signal. We swap the
# `nn.Linear` for a sparse variational dropout layer, fit it by SVI, and let the posterior's
# noise-to-signal ratio α decide which coefficients to keep. Then we look at what the
# log-uniform prior does to coefficients that only *look* non-zero in this sample.
#
# Run as a script (`python tutorials/01_sparse_vd_feature_selection.py`) or open it as a
# notebook with jupytext. `BAYESSPARSE_SMOKE=1` shortens it for CI.

# %%
import os

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import nn

import bayessparse as bs

SMOKE = os.environ.get("BAYESSPARSE_SMOKE") == "1"
STEPS = 300 if SMOKE else 4000
torch.manual_seed(0)
pyro.clear_param_store()

# %% [markdown]
# ## Data: 5 of 30 coefficients are non-zero

# %%
n, d, noise = 500, 30, 0.5
coef = torch.zeros(d, dtype=torch.float64)
support = torch.randperm(d)[:5]
coef[support] = torch.tensor([1.0, -1.5, 2.0, -1.2, 1.8], dtype=torch.float64)
x = torch.randn(n, d, dtype=torch.float64)
y = x @ coef + noise * torch.randn(n, dtype=torch.float64)

# %% [markdown]
# ## Model: a sparse layer inside an ordinary Pyro model
#
# `to_sparse_` replaces the `nn.Linear` in place. The KL to the log-uniform prior enters
# once through `pyro.factor`; the likelihood sits in a data plate. The layer holds its own
# variational parameters, so the guide is empty.

# %%
net = bs.to_sparse_(nn.Sequential(nn.Linear(d, 1, bias=False)).double())
with torch.no_grad():
    net[0].weight.normal_(0, 0.01)


def model(x, y=None):
    pyro.factor("kl", -bs.kl(net))
    mean = net(x).squeeze(-1)
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Normal(mean, noise), obs=y)


optim = bs.JointOptim(torch.optim.Adam, {"lr": 0.02})
svi = SVI(model, bs.EmptyGuide(), optim, Trace_ELBO())
for step in range(STEPS):
    optim.lr_factor = bs.infer.linear_decay(step, STEPS, STEPS / 2)
    loss = svi.step(x, y)
print(f"final loss {loss:.1f}")

# %% [markdown]
# ## Threshold the posterior
#
# `mask()` keeps a weight when `keep_prob() = 1 / (1 + α)` exceeds the layer's default
# threshold, which is the paper's rule log α < 3.

# %%
layer = net[0]
kept = layer.mask()[0]
gram_inv = torch.linalg.inv(x.T @ x)
z = (gram_inv @ x.T @ y) / (noise * gram_inv.diagonal().sqrt())  # least-squares z-scores
print(" feature  true coef  posterior mean  log alpha  |z|   kept")
for j in range(d):
    print(
        f"{j:8d} {coef[j]:10.2f} {layer.weight[0, j]:15.3f} {layer.log_alpha[0, j]:10.2f} "
        f"{z[j].abs():5.1f}   {'yes' if kept[j] else ''}"
    )
truth = coef != 0
print(f"true coefficients kept: {int(kept[truth].sum())} of {int(truth.sum())}")
print(f"null coefficients kept: {int(kept[~truth].sum())} of {int((~truth).sum())}")

# %% [markdown]
# Every true coefficient survives. The null coefficients that survive are the ones whose
# least-squares z-score is large (above about 1.1 here): the log-uniform prior is only
# weakly informative, so sparse VD keeps a coefficient the data make look non-zero, and
# exact support recovery is not what it promises.
#
# ## Export
#
# `to_dense` gives back a plain `nn.Sequential` with the mask in `torch.nn.utils.prune`
# format, or baked into zeros.

# %%
plain = bs.to_dense(net, bake=True)
print(plain)
print(bs.sparsity_report(net))
