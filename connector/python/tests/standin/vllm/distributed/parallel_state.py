"""Stand-in: the tensor-parallel rank comes from the test's environment."""

import os


def get_tensor_model_parallel_rank():
    return int(os.environ.get("KVTIER_TEST_TP_RANK", "0"))
