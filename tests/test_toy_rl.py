"""The seed's toy problems, solved by the same PPO loss functions that train the language model."""

import torch

from rlhf_toy.verify import toy_rl
from rlhf_toy.verify.toy_rl import GridWorld


def test_bandit_ppo_picks_action_2():
    r = toy_rl.train_ppo_bandit(seed=0)
    assert r.solved and r.updates is not None
    assert r.final_eval["action2_rate"] >= 0.95  # greedy, the seed's evaluation
    assert r.final_eval["action2_rate_sampled"] >= 0.95  # sampled from the policy
    # the trained policy also picks action 2 on states it was never trained or evaluated on
    unseen = toy_rl.evaluate_bandit(r.policy, n=500, seed=2024)
    assert unseen["action2_rate"] >= 0.95 and unseen["action2_rate_sampled"] >= 0.9
    assert toy_rl.train_ppo_bandit(seed=0).updates == r.updates  # deterministic


def test_bandit_reinforce_picks_action_2():
    r = toy_rl.train_reinforce_bandit(seed=1)
    assert r.solved
    assert r.final_eval["action2_rate"] >= 0.95 and r.final_eval["action2_rate_sampled"] >= 0.95


def _is_shortest_path(path):
    steps = list(zip(path, path[1:]))
    return (
        path[0] == GridWorld.start
        and path[-1] == GridWorld.goal
        and len(steps) == GridWorld.shortest_path
        and all((b[0] - a[0], b[1] - a[1]) in {(0, 1), (1, 0)} for a, b in steps)
    )


def test_gridworld_ppo_shortest_path():
    r = toy_rl.train_ppo_gridworld(seed=0)
    assert r.solved
    ev = r.final_eval
    assert ev["steps"] == 6 and _is_shortest_path(ev["path"])
    assert ev["shortest_path_prob"] >= 0.9


def test_gridworld_reinforce_shortest_path():
    r = toy_rl.train_reinforce_gridworld(seed=2)
    assert r.solved
    assert r.final_eval["steps"] == 6 and _is_shortest_path(r.final_eval["path"])


def test_gridworld_env_and_shortest_path_probability():
    env = GridWorld()
    assert env.reset() == (0, 0)
    assert env.step(0) == ((0, 0), -0.01, False)  # up into the wall: stays
    assert env.step(3) == ((0, 0), -0.01, False)  # left into the wall
    for a in (1, 1, 1, 2, 2):
        pos, r, done = env.step(a)
    assert (pos, r, done) == ((2, 3), -0.01, False)
    assert env.step(2) == ((3, 3), 1.0, True)

    class Uniform(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(*x.shape[:-1], 4)

    # uniform policy: every shortest path (C(6,3) = 20 of them) has probability (1/4)^6
    p = toy_rl.shortest_path_probability(Uniform())
    assert abs(p - 20 * 0.25**6) < 1e-9
