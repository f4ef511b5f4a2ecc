"""The meta-gradient end to end, in float64 on a GPT-2 (Conv1D) model: one meta-training
step's hypernetwork gradient (the analytic solve backward, then the proxy <G, S(theta)>)
equals autograd through everything: the network, the solve, the edited weights and the
meta-loss (the rephrases' cross-entropy and the NQ locality KL)."""
import copy

import torch
from omegaconf import OmegaConf

from chatedit.data import load_facts
from chatedit.editors import HyperMethod, MalmenConfig, build_hypernet
from chatedit.models import edit_modules, load_model, weight_kv
from chatedit.training.config import TrainConfig
from chatedit.training.meta import MetaTrainer, prepare_data

F64 = torch.float64
LOC = OmegaConf.create({"nq_coef": 2.0, "instruction_coef": 0.0, "harmful_coef": 0.0,
                        "subject_coef": 0.0, "n_instruction": 0, "n_harmful": 0, "pool_size": 4,
                        "response_tokens": 4, "subject_tokens": 4, "max_prompt_chars": 400})


def reference_shifts(hn, captured) -> dict[str, torch.Tensor]:
    """{name: S_l(theta)}: the solve of each group from its normal equations, with autograd."""
    out = {}
    for group in hn.groups(captured):
        net, layers = hn.net(group[0]), [hn.index[n] for n in group]
        d = sum(net.value_shifts(*captured[n], i) for n, i in zip(group, layers))
        ridges = [net.log_lam[i].exp() * torch.eye(net.d_k, dtype=F64)
                  + net.log_mu[i].exp() * net.prior[i] for i in layers]
        k = torch.cat([captured[n][0] for n in group], 1)
        s = torch.linalg.solve(k.T @ k + torch.block_diag(*ridges), k.T @ d)
        out.update(zip(group, s.split(net.d_k)))
    return out


def test_meta_gradient_equals_full_autograd_on_conv1d_in_float64(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATEDIT_CACHE", str(tmp_path))
    model, tok = load_model("tiny-gpt2", dtype=F64)
    modules = edit_modules(model, "mlp.c_proj", [2, 3])
    torch.manual_seed(0)
    hn = build_hypernet(modules, MalmenConfig(rank=8, init_step_size=0.3, init_log_mu=0.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every parameter matters (an untrained network's up-maps are 0)
        for p in hn.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    ed = HyperMethod(model, tok, modules, hn.double(), hyper_chunk=7)
    facts = list(load_facts("zsre", "train"))[:12]
    data = prepare_data(ed, facts[:10], facts[10:], LOC, False, 8)  # sets the key priors
    assert all(net.prior.abs().sum() > 0 for net in hn.nets.values())
    trainer = MetaTrainer(ed, data, OmegaConf.merge(OmegaConf.structured(TrainConfig), {
        "n_edits": 6, "lm_chunk": 4, "max_grad_norm": 1e12}), LOC)
    start = copy.deepcopy(hn.state_dict())
    trainer.step()
    analytic = {n: p.grad.clone() for n, p in hn.named_parameters()}

    hn.load_state_dict(start)  # before the Adam step and the normalisers' update
    hn.zero_grad(set_to_none=True)
    idx = trainer.fact_indices(0)
    captured = ed.capture(trainer.batch([data.edit[i] for i in idx]))
    for name, (k, d) in captured.items():
        hn.update_norm(name, k, d)
    locs = {s: ed.lm.with_final(r, len(r)) for s, r in trainer.loc_rows(0, idx).items() if r}
    shifts = reference_shifts(hn, captured)
    params = {n: m.weight for n, m in modules.items()}
    edited = {n: (ed.master[n].to(F64) + s).detach().requires_grad_() for n, s in shifts.items()}
    try:
        for name, m in modules.items():  # Conv1D stores W as d_k x d_v: the key x value layout
            del m.weight
            m.weight = edited[name]
        trainer.meta_backward({"rephrase_loss": ([data.rephrase[i] for i in idx], 1.0, "ce"),
                               "loc_nq": (locs["nq"], LOC.nq_coef, "kl")})
    finally:
        for name, m in modules.items():
            del m.weight
            m.weight = params[name]
    # dL/dW, then autograd on through W = master + S(theta) to every parameter
    torch.autograd.backward([shifts[n] for n in modules], [edited[n].grad for n in modules])
    assert all(torch.equal(weight_kv(m), ed.master[n].to(F64)) for n, m in modules.items())
    autograd = {n: p.grad for n, p in hn.named_parameters()}
    assert analytic.keys() == autograd.keys()
    for name, want in autograd.items():
        assert torch.allclose(analytic[name], want, rtol=1e-9, atol=1e-14), (
            name, ((analytic[name] - want).norm() / want.norm()).item())
    for part in ("blocks.0.down", "blocks.1.up", "log_lr", "log_lam", "log_mu"):
        assert autograd[f"nets.256x64.{part}"].abs().sum() > 0, part
