"""Reproduce the online_loss arm (cpu preset) of run_arms/train step for step, with extra logging.

    python benchmarks/online_loss_diagnosis.py SEED NSTEPS OUT.jsonl [key=value ...]   (e.g. lfl.monotone=true)
The schedule is the full run's (total = 468 steps at the cpu preset); we just stop after NSTEPS.
Diagnostics are computed on the *same* batch before the step with a functional forward on copies
of the BN buffers (no RNG use, no running-stat update), so the trajectory is the real one.
"""
import json, math, sys, time
import torch, torch.nn.functional as F
from metabook.methods import chapter_config
from metabook.methods.online_loss import OnlineLoss, loss_curve, loss_value
from metabook.meta import forward, model_params
from metabook.train import Context, prepare_data, make_model, seed_everything, lr_at, evaluate
from metabook.data import load_dataset

seed, nsteps, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
over = {}
for kv in sys.argv[4:]:
    k, v = kv.split("=", 1); over[k] = v
cfg = chapter_config("online_loss", "cpu", over)
dev = torch.device("cpu")
ds = load_dataset(cfg["dataset"])
data = prepare_data(cfg, seed, dev, ds)
seed_everything(seed)
model = make_model(cfg, ds.num_classes, dev)
method = OnlineLoss(cfg)
spe = len(data.train); total = max(1, math.ceil(cfg["epochs"] * spe))
streams = data.streams()
method.setup(Context(model, streams, total, spe, ds.num_classes, len(data.train.y), seed))
seed_everything(seed)
with torch.random.fork_rng():
    method.prepare()   # the offline stage, as train() runs it (its own RNG), so we log phi_0
model.train()
C = ds.num_classes
PT = torch.tensor([0.01, 0.1, 0.5, 0.9, 0.99])
grid = torch.linspace(1e-3, 0.999, 200)

def per_class_shape(net):
    """l(p,1) and l(p,0) on a grid: is l(.,1) decreasing, l(.,0) increasing?"""
    with torch.no_grad():
        t = net(torch.stack([grid, torch.ones_like(grid)], 1)); o = net(torch.stack([grid, torch.zeros_like(grid)], 1))
    dt, do = t[1:] - t[:-1], o[1:] - o[:-1]
    return {"l1_inc_frac": (dt > 0).float().mean().item(), "l0_dec_frac": (do < 0).float().mean().item(),
            "l1_range": (t.min().item(), t.max().item()), "l0_range": (o.min().item(), o.max().item()),
            "l1_at": [t[0].item(), t[100].item(), t[-1].item()], "l0_at": [o[0].item(), o[100].item(), o[-1].item()]}

f = open(out, "w")
t0 = time.time()
for step in range(nsteps):
    batch, mb = streams.batch("train", step), streams.batch("meta", step)
    lr = lr_at(step, total, cfg)
    # ---- diagnostics at (theta_t, phi_t), same batch, no side effects
    params = model_params(model)
    logits = forward(model, {k: p.detach() for k, p in params.items()}, batch.x).detach().requires_grad_(True)
    learned = loss_value(method.loss_net, logits, batch.y, reduction="none")
    (gl,) = torch.autograd.grad(learned.sum(), logits)               # per-example dM/dlogits
    with torch.no_grad():
        p = logits.softmax(1); onehot = F.one_hot(batch.y, C).to(p.dtype)
        gce = p - onehot                                             # per-example dCE/dlogits
        pt = p.gather(1, batch.y[:, None]).squeeze(1)
        wrong = pt < 0.01
        gln, gcn = gl.norm(dim=1), gce.norm(dim=1)
        cos = F.cosine_similarity(gl, gce, dim=1)
        curve = loss_curve(method.loss_net, C, PT)
        logit_scale = logits.std(1).mean().item()
    phi_before = torch.cat([q.detach().flatten() for q in method.loss_net.parameters()]).clone()
    theta_before = torch.cat([q.detach().flatten() for q in model.parameters()]).clone()
    m = {k: float(v) for k, v in method.step(batch, mb, lr).items()}
    with torch.no_grad():
        phi_after = torch.cat([q.detach().flatten() for q in method.loss_net.parameters()])
        metag = torch.cat([q.grad.flatten() for q in method.loss_net.parameters()])
        theta_after = torch.cat([q.detach().flatten() for q in model.parameters()])
    row = {"step": step, "lr": lr, "ce": m["loss"], "acc": m["acc"], "learned": m["learned_loss"],
           "meta_loss": m["meta_loss"], "grad_ratio": m["grad_ratio"],
           "frac_pt_lt_0.01": wrong.float().mean().item(), "frac_pt_lt_0.1": (pt < 0.1).float().mean().item(),
           "max_ce": (-pt.clamp_min(1e-30).log()).max().item(), "logit_std": logit_scale,
           "gL_wrong": gln[wrong].mean().item() if wrong.any() else None,
           "gCE_wrong": gcn[wrong].mean().item() if wrong.any() else None,
           "gL_all": gln.mean().item(), "gCE_all": gcn.mean().item(),
           "cos_all": cos.mean().item(), "cos_wrong": cos[wrong].mean().item() if wrong.any() else None,
           "cos_neg_frac": (cos < 0).float().mean().item(),
           "curve": curve.tolist(), "metagrad_norm": metag.norm().item(),
           "dphi_norm": (phi_after - phi_before).norm().item(), "phi_norm": phi_after.norm().item(),
           "dtheta_norm": (theta_after - theta_before).norm().item(), "theta_norm": theta_after.norm().item(),
           "t": time.time() - t0}
    if step % 10 == 0 or step == nsteps - 1:
        row.update(per_class_shape(method.loss_net))
    if (step + 1) % 13 == 0 or step == nsteps - 1:
        row["test_acc"], row["test_loss"] = evaluate(model, data.test)
    f.write(json.dumps(row) + "\n"); f.flush()
print("done", time.time() - t0)
