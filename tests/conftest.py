import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/oracle.py helpers
torch.set_num_threads(1)  # tiny tensors: one thread avoids pool overhead and oversubscription
