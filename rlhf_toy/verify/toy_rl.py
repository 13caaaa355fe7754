"""The seed's toy RL problems, trained with the *same* PPO loss functions as the language model.

Two problems from the seed (seeds/000_4cd3616e2ace358c.txt):

* **Bandit** -- a 2-D random state (ignored by the reward), 4 actions; reward +1 for action 2,
  -0.1 otherwise; single-step episodes.  Solved when, on 200 fresh random states, the greedy
  action is 2 on >= 95% of them (the seed's evaluation) *and* the action *sampled* from the
  policy is 2 on >= 95% of them (the policy has actually converged, not just tipped its argmax).
* **GridWorld** -- 4x4 grid, start (0, 0), goal (3, 3); actions 0=up, 1=right, 2=down, 3=left
  (moves into a wall leave the agent in place); reward -0.01 per step, +1 on reaching the goal.
  Solved when the greedy policy walks from the start to the goal on a shortest path (6 steps)
  *and* an episode sampled from the policy does so with probability >= 0.9 (computed exactly).

Each is trained by PPO -- ``core.gae``, ``core.masked_whiten``, ``core.policy_loss`` and
``core.value_loss``, imported from ``rlhf_toy.stages.ppo.core``, exactly the functions that train the
language model (an episode is a "response", a step a "token") -- and by the seed's REINFORCE
(per-episode update, loss ``-sum log pi(a_t) G_t``).  That is a cheap, exact check that the PPO
objective points the right way.  Everything is seeded and deterministic, seconds on a CPU.

``python -m rlhf_toy.verify.toy_rl`` prints the updates each method needs (seeds 0..4, median).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from rlhf_toy import sequences
from rlhf_toy.stages.ppo import core

# ------------------------------------------------------------------------------------------
# environments
# ------------------------------------------------------------------------------------------
BANDIT_N_ACTIONS = 4
BANDIT_GOOD_ACTION = 2


def bandit_reward(action: torch.Tensor) -> torch.Tensor:
    """+1 for action 2, -0.1 for any other (the seed's ``SimpleEnv``)."""
    return torch.where(action == BANDIT_GOOD_ACTION, torch.tensor(1.0), torch.tensor(-0.1))


def bandit_states(n: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` random 2-D states, uniform in [0, 1)^2 (the seed's ``reset``)."""
    return torch.rand(n, 2, generator=gen)


class GridWorld:
    """The seed's 4x4 ``SimpleGridWorld``: start (0,0), goal (3,3), 0=up 1=right 2=down 3=left."""

    size = 4
    n_actions = 4
    start = (0, 0)
    goal = (3, 3)
    shortest_path = 6  # (size-1) * 2

    def __init__(self) -> None:
        self.pos = self.start

    def reset(self) -> tuple[int, int]:
        self.pos = self.start
        return self.pos

    def step(self, action: int) -> tuple[tuple[int, int], float, bool]:
        r, c = self.pos
        if action == 0:
            r = max(r - 1, 0)
        elif action == 1:
            c = min(c + 1, self.size - 1)
        elif action == 2:
            r = min(r + 1, self.size - 1)
        elif action == 3:
            c = max(c - 1, 0)
        self.pos = (r, c)
        done = self.pos == self.goal
        return self.pos, (1.0 if done else -0.01), done

    @classmethod
    def encode(cls, pos: tuple[int, int]) -> torch.Tensor:
        """One-hot of the 16 cells (a tabular-capable input for the small nets)."""
        x = torch.zeros(cls.size * cls.size)
        x[pos[0] * cls.size + pos[1]] = 1.0
        return x


# ------------------------------------------------------------------------------------------
# small networks
# ------------------------------------------------------------------------------------------
def mlp(n_in: int, n_out: int, hidden: int = 32) -> nn.Module:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, n_out))


def single_thread(fn):
    """Run ``fn`` with one torch thread: these nets are tiny, and on a busy 2-core machine
    intra-op threading makes them ~50x slower, not faster."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(n)

    return wrapper


def _seeded(seed: int, builder):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return builder()


def _sample(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=gen).squeeze(-1)


@dataclass
class ToyResult:
    """``updates``: optimizer updates (PPO: iterations) until solved (None: not solved within the
    budget); ``episodes``: environment episodes used; ``final_eval``: the last evaluation."""

    method: str
    problem: str
    seed: int
    solved: bool
    updates: int | None
    episodes: int
    final_eval: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    optimizer_steps: int = 0
    policy: nn.Module | None = field(default=None, repr=False, compare=False)  # the trained policy


# ------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_bandit(
    policy: nn.Module, n: int = 200, seed: int = 12345, success_rate: float = 0.95
) -> dict[str, Any]:
    """On ``n`` fresh states: greedy action-2 rate (the seed's evaluation), sampled action-2 rate,
    mean pi(2); ``solved`` when both rates are >= ``success_rate``."""
    gen = torch.Generator().manual_seed(seed)
    s = bandit_states(n, gen)
    logits = policy(s)
    greedy = float((logits.argmax(-1) == BANDIT_GOOD_ACTION).float().mean())
    sampled = float((_sample(logits, gen) == BANDIT_GOOD_ACTION).float().mean())
    return {
        "action2_rate": greedy,
        "action2_rate_sampled": sampled,
        "action2_prob": float(torch.softmax(logits, -1)[:, BANDIT_GOOD_ACTION].mean()),
        "solved": greedy >= success_rate and sampled >= success_rate,
    }


@torch.no_grad()
def _walk(policy: nn.Module, max_steps: int, gen: torch.Generator | None):
    env = GridWorld()
    pos = env.reset()
    path = [pos]
    for t in range(1, max_steps + 1):
        logits = policy(GridWorld.encode(pos))
        a = int(logits.argmax()) if gen is None else int(_sample(logits[None], gen))
        pos, _, done = env.step(a)
        path.append(pos)
        if done:
            return t, path
    return None, path


@torch.no_grad()
def shortest_path_probability(policy: nn.Module) -> float:
    """Exact probability that an episode *sampled* from the policy takes a shortest path (6 steps).

    A shortest path only moves right or down, so ``p(cell) = pi(right|cell) p(cell + right) +
    pi(down|cell) p(cell + down)`` (a move into the wall wastes a step: it contributes 0), with
    ``p(goal) = 1``; one batched forward over the 16 cells, then dynamic programming."""
    n = GridWorld.size
    cells = [(r, c) for r in range(n) for c in range(n)]
    probs = torch.softmax(policy(torch.stack([GridWorld.encode(x) for x in cells])), -1)
    p = [[0.0] * n for _ in range(n)]
    for r in reversed(range(n)):
        for c in reversed(range(n)):
            if (r, c) == GridWorld.goal:
                p[r][c] = 1.0
                continue
            pi = probs[r * n + c]
            right = float(pi[1]) * p[r][c + 1] if c + 1 < n else 0.0
            down = float(pi[2]) * p[r + 1][c] if r + 1 < n else 0.0
            p[r][c] = right + down
    return p[0][0]


@torch.no_grad()
def evaluate_gridworld(policy: nn.Module, max_steps: int = 20, success_rate: float = 0.9) -> dict[str, Any]:
    """Greedy walk from the start (steps to the goal, None if never; the path; shortest or not)
    and the exact probability that a sampled episode takes a shortest path; ``solved`` when the
    greedy walk is shortest and that probability is >= ``success_rate``."""
    steps, path = _walk(policy, max_steps, None)
    shortest = steps == GridWorld.shortest_path
    prob = shortest_path_probability(policy)
    return {
        "steps": steps,
        "reached_goal": steps is not None,
        "shortest": shortest,
        "path": path,
        "shortest_path_prob": prob,
        "solved": bool(shortest and prob >= success_rate),
    }


# ------------------------------------------------------------------------------------------
# PPO with rlhf_toy.stages.ppo.core
# ------------------------------------------------------------------------------------------
def _ppo_update(
    policy: nn.Module,
    value: nn.Module,
    opt: torch.optim.Optimizer,
    *,
    obs: torch.Tensor,  # [B, T, D]
    actions: torch.Tensor,  # [B, T]
    rewards: torch.Tensor,  # [B, T]
    mask: torch.Tensor,  # [B, T] bool
    gamma: float,
    lam: float,
    epochs: int,
    cliprange: float,
    cliprange_value: float,
    vf_coef: float,
) -> dict[str, float]:
    """One PPO iteration on a padded batch of episodes, with the language model's loss functions."""
    with torch.no_grad():
        old_logprobs = sequences.logprobs_from_logits(policy(obs), actions, temperature=1.0)
        old_values = value(obs).squeeze(-1)
        advantages, returns = core.gae(rewards, old_values, mask, gamma=gamma, lam=lam)
        advantages = core.masked_whiten(advantages, mask)
    stats: dict[str, float] = {}
    for _ in range(epochs):
        new_logprobs = sequences.logprobs_from_logits(policy(obs), actions, temperature=1.0)
        new_values = value(obs).squeeze(-1)
        pg_loss, pg_stats = core.policy_loss(
            new_logprobs, old_logprobs, advantages, mask, cliprange=cliprange
        )
        vf_loss, vf_clipfrac = core.value_loss(
            new_values, old_values, returns, mask, cliprange_value=cliprange_value
        )
        loss = pg_loss + vf_coef * vf_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        stats = {
            "pg_loss": pg_loss.item(),
            "vf_loss": vf_loss.item(),
            "clipfrac": float(pg_stats["clipfrac"]),
            "approxkl": float(pg_stats["approxkl"]),
            "vf_clipfrac": float(vf_clipfrac),
        }
    return stats


@single_thread
def train_ppo_bandit(
    seed: int = 0,
    *,
    batch_size: int = 16,
    epochs: int = 4,
    lr: float = 3e-3,
    cliprange: float = 0.2,
    cliprange_value: float = 0.2,
    vf_coef: float = 0.5,
    max_iterations: int = 200,
    success_rate: float = 0.95,
) -> ToyResult:
    """PPO on the bandit; each episode is a length-1 "response" (so GAE gives ``A = r - V``)."""
    t0 = time.time()
    policy = _seeded(seed, lambda: mlp(2, BANDIT_N_ACTIONS))
    value = _seeded(seed + 10_000, lambda: mlp(2, 1))
    opt = torch.optim.Adam(list(policy.parameters()) + list(value.parameters()), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    ev = evaluate_bandit(policy)
    for it in range(1, max_iterations + 1):
        with torch.no_grad():
            s = bandit_states(batch_size, gen)
            a = _sample(policy(s), gen)
        r = bandit_reward(a)
        mask = torch.ones(batch_size, 1, dtype=torch.bool)
        _ppo_update(
            policy, value, opt, obs=s[:, None, :], actions=a[:, None], rewards=r[:, None], mask=mask,
            gamma=1.0, lam=1.0, epochs=epochs, cliprange=cliprange,
            cliprange_value=cliprange_value, vf_coef=vf_coef,
        )  # fmt: skip
        ev = evaluate_bandit(policy, success_rate=success_rate)
        if ev["solved"]:
            return ToyResult(
                "ppo", "bandit", seed, True, it, it * batch_size, ev, time.time() - t0, it * epochs, policy
            )
    return ToyResult(
        "ppo",
        "bandit",
        seed,
        False,
        None,
        max_iterations * batch_size,
        ev,
        time.time() - t0,
        max_iterations * epochs,
        policy,
    )


def _rollout_gridworld(policy: nn.Module, n: int, max_steps: int, gen: torch.Generator):
    """``n`` sampled episodes, right-padded to the longest: obs [n,T,16], actions, rewards, mask."""
    episodes = []
    with torch.no_grad():
        for _ in range(n):
            env = GridWorld()
            pos = env.reset()
            obs, acts, rews = [], [], []
            for _ in range(max_steps):
                x = GridWorld.encode(pos)
                a = int(_sample(policy(x)[None], gen))
                pos, r, done = env.step(a)
                obs.append(x)
                acts.append(a)
                rews.append(r)
                if done:
                    break
            episodes.append((obs, acts, rews))
    T = max(len(e[1]) for e in episodes)
    D = GridWorld.size**2
    obs_t = torch.zeros(n, T, D)
    act_t = torch.zeros(n, T, dtype=torch.long)
    rew_t = torch.zeros(n, T)
    mask = torch.zeros(n, T, dtype=torch.bool)
    for i, (o, a, r) in enumerate(episodes):
        L = len(a)
        obs_t[i, :L] = torch.stack(o)
        act_t[i, :L] = torch.tensor(a)
        rew_t[i, :L] = torch.tensor(r)
        mask[i, :L] = True
    return obs_t, act_t, rew_t, mask


@single_thread
def train_ppo_gridworld(
    seed: int = 0,
    *,
    batch_size: int = 8,
    max_steps: int = 30,
    epochs: int = 4,
    lr: float = 1e-2,
    gamma: float = 0.99,
    lam: float = 0.95,
    cliprange: float = 0.2,
    cliprange_value: float = 0.2,
    vf_coef: float = 0.5,
    max_iterations: int = 200,
) -> ToyResult:
    """PPO on the GridWorld; an episode is a padded "response" of up to ``max_steps`` actions."""
    t0 = time.time()
    D = GridWorld.size**2
    policy = _seeded(seed, lambda: mlp(D, GridWorld.n_actions))
    value = _seeded(seed + 10_000, lambda: mlp(D, 1))
    opt = torch.optim.Adam(list(policy.parameters()) + list(value.parameters()), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    ev = evaluate_gridworld(policy)
    for it in range(1, max_iterations + 1):
        obs, act, rew, mask = _rollout_gridworld(policy, batch_size, max_steps, gen)
        _ppo_update(
            policy, value, opt, obs=obs, actions=act, rewards=rew, mask=mask, gamma=gamma, lam=lam, epochs=epochs,
            cliprange=cliprange, cliprange_value=cliprange_value, vf_coef=vf_coef,
        )  # fmt: skip
        ev = evaluate_gridworld(policy)
        if ev["solved"]:
            return ToyResult(
                "ppo", "gridworld", seed, True, it, it * batch_size, ev, time.time() - t0, it * epochs
            )
    return ToyResult(
        "ppo",
        "gridworld",
        seed,
        False,
        None,
        max_iterations * batch_size,
        ev,
        time.time() - t0,
        max_iterations * epochs,
    )


# ------------------------------------------------------------------------------------------
# the seed's REINFORCE baseline
# ------------------------------------------------------------------------------------------
@single_thread
def train_reinforce_bandit(
    seed: int = 0,
    *,
    lr: float = 3e-3,
    max_episodes: int = 3000,
    success_rate: float = 0.95,
    eval_every: int = 1,
) -> ToyResult:
    """The seed's bandit loop: one episode, ``loss = -log pi(a) * r``, one Adam step."""
    t0 = time.time()
    policy = _seeded(seed, lambda: mlp(2, BANDIT_N_ACTIONS))
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    ev = evaluate_bandit(policy)
    for ep in range(1, max_episodes + 1):
        s = bandit_states(1, gen)
        logits = policy(s)
        with torch.no_grad():
            a = _sample(logits, gen)
        logp = torch.log_softmax(logits, -1).gather(-1, a[:, None]).squeeze()
        loss = -logp * bandit_reward(a).squeeze()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ep % eval_every == 0:
            ev = evaluate_bandit(policy, success_rate=success_rate)
            if ev["solved"]:
                return ToyResult("reinforce", "bandit", seed, True, ep, ep, ev, time.time() - t0, ep)
    return ToyResult(
        "reinforce", "bandit", seed, False, None, max_episodes, ev, time.time() - t0, max_episodes
    )


@single_thread
def train_reinforce_gridworld(
    seed: int = 0,
    *,
    lr: float = 1e-2,
    gamma: float = 0.99,
    max_steps: int = 30,
    max_episodes: int = 3000,
    eval_every: int = 1,
) -> ToyResult:
    """The seed's REINFORCE: roll out one episode, discounted returns ``G_t``, normalised within
    the episode, ``loss = -sum_t log pi(a_t|s_t) G_t``, one Adam step per episode."""
    t0 = time.time()
    D = GridWorld.size**2
    policy = _seeded(seed, lambda: mlp(D, GridWorld.n_actions))
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    ev = evaluate_gridworld(policy)
    for ep in range(1, max_episodes + 1):
        env = GridWorld()
        pos = env.reset()
        logps, rewards = [], []
        for _ in range(max_steps):
            logits = policy(GridWorld.encode(pos))
            with torch.no_grad():
                a = _sample(logits[None], gen)
            logps.append(torch.log_softmax(logits, -1)[a].squeeze())
            pos, r, done = env.step(int(a))
            rewards.append(r)
            if done:
                break
        returns, G = [], 0.0
        for r in reversed(rewards):
            G = r + gamma * G
            returns.insert(0, G)
        ret = torch.tensor(returns)
        if len(ret) > 1:
            ret = (ret - ret.mean()) / (ret.std() + 1e-8)
        loss = -(torch.stack(logps) * ret).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if ep % eval_every == 0:
            ev = evaluate_gridworld(policy)
            if ev["solved"]:
                return ToyResult("reinforce", "gridworld", seed, True, ep, ep, ev, time.time() - t0, ep)
    return ToyResult(
        "reinforce", "gridworld", seed, False, None, max_episodes, ev, time.time() - t0, max_episodes
    )


# ------------------------------------------------------------------------------------------
# table
# ------------------------------------------------------------------------------------------
TRAINERS = {
    ("bandit", "ppo"): train_ppo_bandit,
    ("bandit", "reinforce"): train_reinforce_bandit,
    ("gridworld", "ppo"): train_ppo_gridworld,
    ("gridworld", "reinforce"): train_reinforce_gridworld,
}


def comparison_table(seeds=range(5)) -> tuple[str, list[ToyResult]]:
    """Updates (PPO: iterations, each a batch of episodes and ``epochs`` Adam steps; REINFORCE:
    one Adam step per episode), Adam steps and episodes needed: medians over ``seeds``."""
    results: list[ToyResult] = []
    rows = []

    def med(xs):
        xs = [x for x in xs if x is not None]
        return statistics.median(xs) if xs else float("nan")

    for (problem, method), fn in TRAINERS.items():
        rs = [fn(seed=s) for s in seeds]
        results += rs
        ok = [r for r in rs if r.solved]
        rows.append(
            (
                problem,
                method,
                f"{len(ok)}/{len(rs)}",
                med(r.updates for r in ok),
                med(r.optimizer_steps for r in ok),
                med(r.episodes for r in ok),
                [r.updates for r in rs],
                sum(r.seconds for r in rs),
            )  # fmt: skip
        )
    head = (
        f"{'problem':<10} {'method':<10} {'solved':>6} {'updates':>8} {'Adam steps':>11} {'episodes':>9}"
        f"  {'updates per seed':<26} {'time':>6}"
    )
    lines = [head, "-" * len(head)]
    for p, m, sv, mu, ms, me, per, secs in rows:
        lines.append(f"{p:<10} {m:<10} {sv:>6} {mu:>8g} {ms:>11g} {me:>9g}  {str(per):<26} {secs:5.1f}s")
    lines.append(
        f"medians over seeds {list(seeds)}; updates: PPO = iterations (a batch of episodes, 4 epochs of"
    )
    lines.append(
        "full-batch Adam steps on the clipped loss); REINFORCE = episodes (one Adam step each, the seed's loop)."
    )
    return "\n".join(lines), results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description="PPO (rlhf_toy.stages.ppo.core) vs REINFORCE on the seed's toy problems"
    )
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    args = ap.parse_args(argv)
    table, _ = comparison_table(range(args.seeds))
    print(table)


if __name__ == "__main__":
    main()
