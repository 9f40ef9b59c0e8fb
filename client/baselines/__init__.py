"""The client halves of the first-order baselines: DP-SGD / DP-Adam with Opacus, and the FedAvg node."""
