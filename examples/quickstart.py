"""Which training examples made the model say this? A tiny classifier on synthetic data, on CPU."""

import torch
from torch import nn
from torch.utils.data import TensorDataset

import influence

torch.manual_seed(0)
x = torch.randn(200, 5)
y = (x[:, 0] + 0.5 * x[:, 1] + 0.5 * torch.randn(200) > 0).long()
y[:10] = 1 - y[:10]  # ten flipped labels
train, queries = TensorDataset(x[:180], y[:180]), TensorDataset(x[180:], y[180:])

model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 2))
optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
for _ in range(100):
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x[:180]), y[:180]).backward()
    optimizer.step()

task = influence.ClassificationTask(measurement="loss")
scores = influence.attribute(task, model, train, queries, method="if", solver="exact", damping=1e-3)
print("scores", tuple(scores.shape), "(queries x training examples; positive = proponent)")
for q in range(3):
    top = scores[q].topk(3)
    print(f"query {q}: top proponents {top.indices.tolist()}, scores {[f'{s:.1e}' for s in top.values.tolist()]}")

# each training example's influence on itself: mislabelled examples stand out
self_scores = influence.self_influence(task, model, train, method="if", solver="exact", damping=1e-3)
print("highest self-influence:", self_scores.topk(10).indices.tolist(), "(0-9 had their labels flipped)")
