"""Tests of megalora.parallel_groups: layout answers read from explicit process groups."""

from __future__ import annotations

from tests.multirank import run_on_ranks


def _answers():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megalora import parallel_start
    from megalora.parallel_groups import is_first_replica, is_stage_writer, model_tp_group, replica_groups

    parallel_start.init_parallel(tensor_model_parallel_size=2)  # 4 ranks: TP 2 x DP 2
    tp, dp_cp = ps.get_tensor_model_parallel_group(), ps.get_data_parallel_group(with_context_parallel=True)
    tp_rank, dp_rank = ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(with_context_parallel=True)
    assert model_tp_group() is tp and replica_groups() == [dp_cp, tp]
    assert is_first_replica() == (dp_rank == 0)
    assert is_stage_writer() == (dp_rank == 0 and tp_rank == 0)

    # An explicit collection wins over megatron's globals: with the roles of the
    # two groups swapped, every answer follows the groups passed in.
    swapped = ProcessGroupCollection(tp=dp_cp, pp=ps.get_pipeline_model_parallel_group(), dp_cp=tp)
    assert model_tp_group(swapped) is dp_cp and replica_groups(swapped) == [tp, dp_cp]
    assert is_first_replica(swapped) == (tp_rank == 0)
    writer = is_stage_writer()

    parallel_start.destroy_parallel()  # plain torch.distributed: the global rank decides
    assert model_tp_group() is None and replica_groups() == [None]
    assert is_first_replica() == is_stage_writer() == (dist.get_rank() == 0)
    return writer


def test_layout_answers_follow_the_groups():
    assert run_on_ranks(4, _answers) == [True, False, False, False]
