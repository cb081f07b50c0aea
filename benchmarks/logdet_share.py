"""How much of LLAMA's meta-gradient comes from its Laplace term, on a trained run.

    python benchmarks/logdet_share.py runs/tune-digits/llama-eta1e-06-tau0.001-seed0/checkpoint.pt

For meta-batches of the run's training split, the norms of the two parts of the
meta-gradient of LLAMA's task objective L_qry(φ̂) + η·log det Ĥ(φ̂) with respect to θ:
‖∇θ mean L_qry‖ and ‖∇θ η·mean log det Ĥ‖, their ratio and the cosine between them, at the
run's η and τ (or ``--eta``/``--tau``). A ratio near or above 1 means the Laplace term steers
meta-training as much as the query loss does.
"""

from __future__ import annotations

import argparse

import torch

from fastlaplace.meta import LLAMA
from fastlaplace.runs import load_for_evaluation


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a LLAMA (or MAML) checkpoint.pt")
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--eta", type=float, nargs="+", default=None, help="default: the run's η")
    p.add_argument("--tau", type=float, default=None, help="default: the run's τ")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    learner, problem, cfg = load_for_evaluation(args.checkpoint)
    tau = args.tau if args.tau is not None else cfg.tau
    etas = args.eta or [cfg.eta]
    llama = LLAMA(learner.model, inner_lr=learner.inner_lr, inner_steps=learner.inner_steps,
                  loss=learner.loss, eta=1.0, tau=tau)
    theta = [p for p in llama.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(args.seed)
    q_norms, l_norms, cosines = [], [], []
    for _ in range(args.batches):
        b = problem.sample("train", cfg.meta_batch, generator)
        parts = llama.meta_objective(b.x_support, b.y_support, b.x_query, b.y_query, generator)
        g_q = torch.autograd.grad(parts.query_loss.mean(), theta, retain_graph=True, allow_unused=True)
        g_l = torch.autograd.grad(parts.logdet.mean(), theta, allow_unused=True)
        flat = lambda gs: torch.cat([(g if g is not None else torch.zeros_like(t)).reshape(-1)
                                     for g, t in zip(gs, theta)])
        gq, gl = flat(g_q), flat(g_l)
        q_norms.append(gq.norm())
        l_norms.append(gl.norm())
        cosines.append(torch.nn.functional.cosine_similarity(gq, gl, dim=0))
    q, lnorm, cos = torch.stack(q_norms).mean(), torch.stack(l_norms).mean(), torch.stack(cosines).mean()
    print(f"{args.checkpoint}: τ = {tau:g}, {args.batches} meta-batches of {cfg.meta_batch} tasks")
    print(f"‖∇θ L_qry‖ = {q:.4g}; ‖∇θ log det Ĥ‖ = {lnorm:.4g}; cosine between them {cos:+.3f}")
    for eta in etas:
        print(f"η = {eta:g}: ‖∇θ η·log det Ĥ‖ / ‖∇θ L_qry‖ = {eta * lnorm / q:.3g}")


if __name__ == "__main__":
    main()
