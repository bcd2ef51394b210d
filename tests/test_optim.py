"""LMO optimizer against torch.optim.Muon / torch.optim.AdamW / hand-written formulas; presets on real model classes."""

import copy
import math

import pytest
import torch
from torch import nn

import ef_lightning as efl
from ef_lightning.optim import LMO, format_groups, lmo_update_, momentum_direction_, param_groups

transformers = pytest.importorskip("transformers")




def grads_for(params, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(steps)]


def run(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


def make_params(*shapes, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


# ---------------------------------------------------------------- parity with torch optimizers


@pytest.mark.parametrize("nesterov", [True, False])
def test_spectral_muon_follows_torch_muon(nesterov):
    shapes = [(32, 16), (16, 32), (24, 24)]
    ours, ref = make_params(*shapes), make_params(*shapes)
    grads = grads_for(ours, 10)
    opt = LMO([{"params": ours, "norm": "spectral_muon", "ns_dtype": torch.bfloat16}], lr=0.02, momentum=0.95,
              nesterov=nesterov, weight_decay=0.1)
    ref_opt = torch.optim.Muon(ref, lr=0.02, momentum=0.95, nesterov=nesterov, weight_decay=0.1)
    run(opt, ours, grads)
    run(ref_opt, ref, grads)
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)  # bit for bit; the spec's tolerance would be 1e-6
    for p, q in zip(ours, ref):
        assert torch.equal(opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"])


def test_adamw_group_follows_torch_adamw():
    ours, ref = make_params((8, 4), (5,)), make_params((8, 4), (5,))
    mat_ours, mat_ref = make_params((6, 6), seed=2), make_params((6, 6), seed=2)
    grads = grads_for(ours + mat_ours, 10)
    opt = LMO([{"params": ours, "norm": "adamw", "lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8},
               {"params": mat_ours, "norm": "sign"}], lr=0.01, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    run(opt, ours + mat_ours, grads)
    run(ref_opt, ref, [g[:2] for g in grads])
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][k], ref_opt.state[q][k])


# ---------------------------------------------------------------- hand-written formulas


def test_momentum_direction_formula():
    M, g = torch.randn(3, 4), torch.randn(3, 4)
    M0 = M.clone()
    D = momentum_direction_(M, g, 0.9, nesterov=False)
    torch.testing.assert_close(M, 0.9 * M0 + 0.1 * g)
    assert D is M
    M = M0.clone()
    D = momentum_direction_(M, g, 0.9, nesterov=True)
    torch.testing.assert_close(D, 0.1 * g + 0.9 * (0.9 * M0 + 0.1 * g))


def test_sign_update_with_momentum_and_weight_decay_matches_formula():
    (p,) = make_params((6, 4))
    X, M = p.detach().clone(), torch.zeros(6, 4)
    grads = grads_for([p], 5)
    lr, scale, mu, wd = 0.05, 3.0, 0.8, 0.2
    opt = LMO([{"params": [p], "norm": "sign", "scale": scale}], lr=lr, momentum=mu, weight_decay=wd)
    run(opt, [p], grads)
    for (g,) in grads:
        M = mu * M + (1 - mu) * g
        X = X * (1 - lr * wd) - lr * scale * torch.sign(M) / 4
    torch.testing.assert_close(p.detach(), X)


def test_constrained_is_scion_frank_wolfe_form():
    (p,) = make_params((5, 7))
    X, M = p.detach().clone(), torch.zeros(5, 7)
    grads = grads_for([p], 4)
    lr, scale, mu = 0.1, 2.0, 0.5
    opt = LMO([{"params": [p], "norm": "col_norm", "scale": scale, "constrained": True}], lr=lr, momentum=mu)
    run(opt, [p], grads)
    for (g,) in grads:
        M = mu * M + (1 - mu) * g
        d = math.sqrt(5) * M / M.norm(dim=0, keepdim=True)
        X = (1 - lr) * X - lr * scale * d
    torch.testing.assert_close(p.detach(), X)


@pytest.mark.parametrize("l0,l1", [(2.0, 0.5), (0.0, 1.5), (1.0, 0.0)])
def test_gluon_adaptive_radius_matches_formula(l0, l1):
    (w, b) = make_params((6, 4), (6,))
    Xw, Xb = w.detach().clone(), b.detach().clone()
    grads = grads_for([w, b], 3)
    opt = LMO([{"params": [w], "norm": "sign", "l0": l0, "l1": l1},
               {"params": [b], "norm": "bias_rms", "l0": l0, "l1": l1}], lr=123.0, momentum=0.0)
    run(opt, [w, b], grads)
    for gw, gb in grads:
        dual_w = gw.abs().sum() / 4  # ‖G‖_* of the sign norm
        Xw = Xw - dual_w / (l0 + l1 * dual_w) * torch.sign(gw) / 4
        dual_b = math.sqrt(6) * gb.norm()  # ‖g‖_* of the RMS norm
        Xb = Xb - dual_b / (l0 + l1 * dual_b) * gb / gb.pow(2).mean().sqrt()
    torch.testing.assert_close(w.detach(), Xw)
    torch.testing.assert_close(b.detach(), Xb)


def test_external_momentum_uses_grad_as_direction_and_keeps_no_buffer():
    (w,) = make_params((4, 4))
    (a,) = make_params((3,), seed=2)
    opt = LMO([{"params": [w], "norm": "row_norm", "scale": 2.0}, {"params": [a], "norm": "adamw"}], lr=0.1,
              weight_decay=0.5, external_momentum=True)
    assert opt.external_momentum and "momentum_buffer" not in opt.state[w] and "exp_avg" in opt.state[a]
    X, D = w.detach().clone(), torch.randn(4, 4)
    w.grad, a.grad = D.clone(), torch.randn(3)
    opt.step()
    ref = X * (1 - 0.1 * 0.5) - 0.1 * 2.0 * D / (2.0 * D.norm(dim=1, keepdim=True))
    torch.testing.assert_close(w.detach(), ref)
    assert "momentum_buffer" not in opt.state[w] and opt.state[a]["step"] == 1
    # lmo_update_ is that same step, as a pure function
    X2 = X.clone()
    lmo_update_(X2, D, opt.param_groups[0])
    torch.testing.assert_close(X2, ref)


# ---------------------------------------------------------------- state, checkpoints, schedulers, validation


def test_state_is_eager_and_checkpoint_roundtrip_continues_identically():
    params = make_params((8, 4), (4,))
    opt = LMO([{"params": params[:1], "norm": "spectral"}, {"params": params[1:], "norm": "adamw"}], lr=0.01)
    sd0 = opt.state_dict()
    assert set(sd0["state"]) == {0, 1} and set(sd0["state"][0]) == {"momentum_buffer"}
    grads = grads_for(params, 6)
    run(opt, params, grads[:3])
    sd = copy.deepcopy(opt.state_dict())
    assert {k: set(v) for k, v in sd["state"].items()} == {k: set(v) for k, v in sd0["state"].items()}
    params2 = [nn.Parameter(p.detach().clone()) for p in params]
    opt2 = LMO([{"params": params2[:1], "norm": "spectral"}, {"params": params2[1:], "norm": "adamw"}], lr=0.01)
    opt2.load_state_dict(sd)
    run(opt, params, grads[3:])
    run(opt2, params2, grads[3:])
    for p, q in zip(params, params2):
        assert torch.equal(p, q)


def test_lr_scheduler_keys_are_tolerated():
    params = make_params((4, 4))
    opt = LMO(params, lr=0.1, norm="sign")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert opt.param_groups[0]["initial_lr"] == 0.1 and opt.param_groups[0]["lr"] == 0.05
    params[0].grad = torch.ones(4, 4)
    opt.step()
    sched.step()
    opt.add_param_group({"params": make_params((2, 2), seed=3), "initial_lr": 0.1, "max_lr": 1.0})


@pytest.mark.parametrize("group,match", [
    ({"lrr": 0.1}, r"'lrr'.*valid keys:.*'lr'"),
    ({"norm": "spectal"}, r"'spectal'.*valid norms:.*spectral_muon.*adamw"),
    ({"momentum": 1.0}, r"momentum"),
    ({"constrained": True, "weight_decay": 0.1}, r"weight_decay"),
    ({"l0": 0.0, "l1": 0.0}, r"l0 > 0 or l1 > 0"),
    ({"transpose": True, "params": [nn.Parameter(torch.zeros(3))]}, r"2-D"),
])
def test_bad_groups_raise_value_error(group, match):
    with pytest.raises(ValueError, match=match):
        LMO([{"params": make_params((3, 3)), **group}], lr=0.1)


def test_bad_constructor_arguments_raise():
    with pytest.raises(ValueError, match="unknown norm 'nope'"):
        LMO(make_params((3, 3)), lr=0.1, norm="nope")
    with pytest.raises(TypeError):
        LMO(make_params((3, 3)), lr=0.1).add_param_group([nn.Parameter(torch.zeros(2))])


# ---------------------------------------------------------------- presets on real models


def tiny_llama():
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, tie_word_embeddings=False,
                                   bos_token_id=0, eos_token_id=1)
    return transformers.LlamaForCausalLM(cfg)


def tiny_gpt2():
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=16,
                                  bos_token_id=0, eos_token_id=1)
    return transformers.GPT2LMHeadModel(cfg)


def mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(x)).mean(dim=(2, 3)))


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "mlp": mlp, "cnn": CNN}


def by_name(groups):
    return {n: g for g in groups for n in g["param_names"]}


@pytest.mark.parametrize("preset", ["gluon", "scion", "muon"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_every_parameter_in_exactly_one_group(model_name, preset):
    model = MODELS[model_name]()
    groups = param_groups(model, preset)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    for g in groups:
        assert len(g["params"]) == len(g["param_names"]) and g["role"] in efl.optim.ROLES
        for role in ("embedding", "head"):
            if g["role"] == role:
                assert "spectral" not in g["norm"]
                assert (g["norm"] == "adamw") == (preset == "muon")
        if preset == "muon" and g["role"] == "vector":
            assert g["norm"] == "adamw"
    opt = efl.build_lmo_optimizer(model, preset, verbose=False)
    assert len(opt.param_groups) == len(groups)


def test_llama_roles():
    g = by_name(param_groups(tiny_llama(), "gluon"))
    assert g["model.embed_tokens.weight"]["role"] == "embedding"
    assert g["model.embed_tokens.weight"]["norm"] == "col_norm" and g["model.embed_tokens.weight"]["transpose"]
    assert g["lm_head.weight"]["role"] == "head" and g["lm_head.weight"]["norm"] == "sign"
    assert g["model.layers.0.self_attn.q_proj.weight"]["norm"] == "spectral"
    assert g["model.norm.weight"]["norm"] == "bias_rms"
    m = by_name(param_groups(tiny_llama(), "muon"))
    assert m["model.layers.1.mlp.down_proj.weight"]["norm"] == "spectral_muon"
    assert {m[n]["norm"] for n in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight")} == {"adamw"}


def test_gpt2_tied_head_and_conv1d_orientation():
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    g = by_name(param_groups(model, "scion"))
    tied = g["transformer.wte.weight"]
    assert tied["role"] == "head" and tied["norm"] == "sign" and not tied.get("transpose", False)
    assert g["transformer.wpe.weight"]["role"] == "embedding"
    c_attn = g["transformer.h.0.attn.c_attn.weight"]
    assert c_attn["role"] == "hidden" and c_attn["norm"] == "spectral" and c_attn["transpose"]
    # A Conv1D step equals the step of the equivalent nn.Linear (weight = Conv1D.weight.T), transposed.
    conv = model.transformer.h[0].mlp.c_fc  # weight (32, 128) stored (in, out)
    lin = nn.Linear(32, 128, bias=False)
    lin.weight.data = conv.weight.detach().T.clone()
    G = torch.randn(32, 128)
    conv.weight.grad, lin.weight.grad = G.clone(), G.T.clone()
    for params, transpose in (([conv.weight], True), ([lin.weight], False)):
        LMO([{"params": params, "norm": "spectral", "transpose": transpose}], lr=0.1, momentum=0.0).step()
    torch.testing.assert_close(conv.weight.detach(), lin.weight.detach().T)


def test_mlp_and_cnn_roles():
    g = by_name(param_groups(mlp(), "gluon"))
    assert g["5.weight"]["role"] == "head" and g["0.weight"]["role"] == g["2.weight"]["role"] == "hidden"
    assert g["5.bias"]["role"] == g["3.weight"]["role"] == "vector"
    c = by_name(param_groups(CNN(), "gluon"))
    assert c["conv1.weight"]["role"] == "conv" and c["conv1.weight"]["norm"] == "spectral_conv"
    assert c["fc.weight"]["role"] == "head" and c["bn.weight"]["role"] == "vector"
    m = by_name(param_groups(CNN(), "muon"))
    assert m["conv2.weight"]["norm"] == "spectral_muon" and m["fc.weight"]["norm"] == "adamw"


def test_overrides_glob_regex_and_role():
    groups = param_groups(mlp(), "gluon", overrides={
        "*.bias": {"norm": "sign", "scale": 7.0},
        "re:[02]\\.weight": {"l0": 1.0, "l1": 0.1},
        "5.weight": {"role": "hidden"},
    })
    g = by_name(groups)
    assert g["0.bias"]["norm"] == "sign" and g["0.bias"]["scale"] == 7.0 and g["0.bias"]["role"] == "vector"
    assert g["2.weight"]["l0"] == 1.0 and "l0" not in g["5.weight"]
    assert g["5.weight"]["role"] == "hidden" and g["5.weight"]["norm"] == "spectral"
    with pytest.raises(ValueError, match="matches no"):
        param_groups(mlp(), "gluon", overrides={"nothing.*": {"scale": 1.0}})
    with pytest.raises(ValueError, match=r"'scal'.*valid keys"):
        param_groups(mlp(), "gluon", overrides={"*": {"scal": 1.0}})
    with pytest.raises(ValueError, match=r"'hiden'.*valid roles"):
        param_groups(mlp(), "gluon", overrides={"*": {"role": "hiden"}})


def test_bad_preset_raises():
    with pytest.raises(ValueError, match=r"'adam'.*gluon, scion, muon"):
        efl.build_lmo_optimizer(mlp(), "adam")
    with pytest.raises(ValueError, match=r"'adam'.*gluon, scion, muon"):
        param_groups(mlp(), "adam")


def test_build_prints_group_table(capsys):
    model = mlp()
    opt = efl.build_lmo_optimizer(model, "muon")
    out = capsys.readouterr().out
    assert "spectral_muon" in out and "adamw" in out
    n_params = sum(p.numel() for p in model.parameters())
    assert f"{n_params:,}" in out and format_groups(opt.param_groups) in out
    efl.build_lmo_optimizer(model, "gluon", verbose=False)
    assert capsys.readouterr().out == ""
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.95


@pytest.mark.parametrize("preset", ["gluon", "scion", "muon"])
def test_presets_train_tiny_llama(preset):
    torch.manual_seed(0)
    model = tiny_llama()
    opt = efl.build_lmo_optimizer(model, preset, verbose=False)
    x = torch.randint(0, 100, (4, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(8):
        loss = model(input_ids=x, labels=x).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
