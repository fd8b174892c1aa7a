import torch


def pytest_addoption(parser):
    parser.addoption("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                     help="device of the op microbenchmarks (bench/test_ops_microbench.py)")
