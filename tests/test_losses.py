"""Cox partial-likelihood loss against lifelines (Efron), an independent numpy Breslow/Efron and DDP."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# lifelines and sksurv are imported inside the fixtures: the DDP test's spawned workers import
# this module, and should only pay for torch.
from raypipe.losses import CoxPHLoss, cox_ph_loss, cox_ph_loss_distributed


def _numpy_partial_loglik(r: np.ndarray, t: np.ndarray, e: np.ndarray, ties: str) -> float:
    """Textbook O(n^2) Cox partial log-likelihood, looping over distinct event times."""
    ll = 0.0
    for time in np.unique(t[e == 1]):
        dead = (t == time) & (e == 1)
        at_risk = np.exp(r[t >= time]).sum()
        tied = np.exp(r[dead]).sum()
        d = int(dead.sum())
        ll += r[dead].sum()
        if ties == "breslow":
            ll -= d * np.log(at_risk)
        else:
            ll -= sum(np.log(at_risk - l / d * tied) for l in range(d))
    return ll


def _tensors(r, t, e):
    return torch.tensor(np.asarray(r, float)), torch.tensor(np.asarray(t, float)), torch.tensor(np.asarray(e, float))


def _lifelines_case(df, duration: str, event: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    from lifelines import CoxPHFitter

    cph = CoxPHFitter().fit(df, duration, event)
    x = df.drop(columns=[duration, event]).to_numpy(float)
    return x @ cph.params_.to_numpy(), df[duration].to_numpy(float), df[event].to_numpy(float), cph.log_likelihood_


@pytest.fixture(scope="module")
def rossi_case():
    from lifelines.datasets import load_rossi

    return _lifelines_case(load_rossi(), "week", "arrest")  # 432 rows, 114 events, heavily tied weeks


@pytest.fixture(scope="module")
def gbsg2_case():
    from sksurv.datasets import load_gbsg2
    from sksurv.preprocessing import OneHotEncoder

    x, y = load_gbsg2()
    df = OneHotEncoder().fit_transform(x).assign(time=y["time"], event=y["cens"].astype(int))
    return _lifelines_case(df, "time", "event")


@pytest.mark.parametrize("case", ["rossi_case", "gbsg2_case"])
def test_efron_equals_lifelines_log_likelihood(case, request):
    r, t, e, log_lik = request.getfixturevalue(case)
    loss = cox_ph_loss(*_tensors(r, t, e), ties="efron")
    assert float(loss) * e.sum() == pytest.approx(-log_lik, abs=1e-6)
    assert float(loss) * e.sum() == pytest.approx(-_numpy_partial_loglik(r, t, e, "efron"), abs=1e-6)


def test_breslow_equals_numpy(rossi_case):
    r, t, e, _ = rossi_case
    loss = cox_ph_loss(*_tensors(r, t, e), ties="breslow")
    assert float(loss) == pytest.approx(-_numpy_partial_loglik(r, t, e, "breslow") / e.sum(), abs=1e-9)


def test_random_ties_both_methods_and_no_ties_agree():
    rng = np.random.default_rng(0)
    r, t, e = rng.normal(size=200), rng.integers(1, 15, 200).astype(float), (rng.random(200) < 0.6).astype(float)
    for ties in ("breslow", "efron"):
        loss = cox_ph_loss(*_tensors(r, t, e), ties=ties)
        assert float(loss) == pytest.approx(-_numpy_partial_loglik(r, t, e, ties) / e.sum(), abs=1e-9)
    t_unique = rng.permutation(200).astype(float) + 1
    args = _tensors(r, t_unique, e)
    assert float(cox_ph_loss(*args, ties="efron")) == pytest.approx(float(cox_ph_loss(*args, ties="breslow")), abs=1e-12)


def test_against_pycox_without_ties(gbsg2_case):
    pycox_loss = pytest.importorskip("pycox.models.loss")
    r, t, e, _ = gbsg2_case
    _, first = np.unique(t, return_index=True)  # tie-free subset: pycox ignores ties
    args = _tensors(r[first], t[first], e[first])
    assert float(cox_ph_loss(*args)) == pytest.approx(float(pycox_loss.cox_ph_loss(*args)), abs=1e-6)


def test_gradients_and_stability():
    rng = np.random.default_rng(1)
    r, t, e = _tensors(rng.normal(size=30), rng.integers(1, 6, 30), rng.random(30) < 0.5)
    for ties in ("breslow", "efron"):
        assert torch.autograd.gradcheck(lambda x, ties=ties: cox_ph_loss(x, t, e, ties), (r.clone().requires_grad_(),))
        shifted = cox_ph_loss(r + 1000.0, t, e, ties)  # no overflow: invariant to a shift of all log-risks
        assert torch.isfinite(shifted) and float(shifted) == pytest.approx(float(cox_ph_loss(r, t, e, ties)), abs=1e-9)
    r32 = torch.randn(4096, 1, requires_grad=True) * 30  # float32, (n, 1) as a network outputs it
    loss = CoxPHLoss()(r32, torch.randint(1, 50, (4096,)), torch.rand(4096) < 0.3)
    loss.backward()
    assert torch.isfinite(loss)


def test_zero_events_gives_zero_with_gradient():
    r = torch.randn(5, requires_grad=True)
    loss = cox_ph_loss(r, torch.arange(5.0), torch.zeros(5))
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(r.grad, torch.zeros(5))


def test_invalid_input():
    with pytest.raises(ValueError, match="equal lengths"):
        cox_ph_loss(torch.zeros(3), torch.ones(2), torch.ones(3))
    with pytest.raises(ValueError, match="0/1"):
        cox_ph_loss(torch.zeros(3), torch.ones(3), torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="ties"):
        cox_ph_loss(torch.zeros(3), torch.ones(3), torch.ones(3), ties="exact")


def test_distributed_equals_single_process_when_not_initialised(rossi_case):
    args = _tensors(*rossi_case[:3])
    assert float(cox_ph_loss_distributed(*args)) == float(cox_ph_loss(*args))


def _worker(rank: int, world: int, port: int, out: str, r: np.ndarray, t: np.ndarray, e: np.ndarray, split: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        part = slice(0, split) if rank == 0 else slice(split, None)  # unequal local batches
        local = torch.tensor(r[part], requires_grad=True)
        loss = cox_ph_loss_distributed(local, torch.tensor(t[part]), torch.tensor(e[part]), ties="efron")
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": local.grad}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_distributed_two_gloo_workers_equal_global_batch(rossi_case, tmp_path):
    r, t, e, _ = rossi_case
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    split = 250
    mp.spawn(_worker, args=(2, port, str(tmp_path), r, t, e, split), nprocs=2, join=True)
    single = torch.tensor(r, requires_grad=True)
    loss = cox_ph_loss(single, torch.tensor(t), torch.tensor(e))
    loss.backward()
    results = [torch.load(tmp_path / f"rank{k}.pt") for k in range(2)]
    for res in results:
        assert float(res["loss"]) == pytest.approx(float(loss.detach()), abs=1e-10)
    # each worker holds world_size x its share, so DDP's averaging gives the single-process gradient
    grads = torch.cat([res["grad"] for res in results]) / 2
    torch.testing.assert_close(grads, single.grad, atol=1e-10, rtol=0)
