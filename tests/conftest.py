"""Test configuration: float64 by default, strict rank promotion, warnings as
errors, JAX's persistent compilation cache (`experiments.jax_cache`)."""

import os

# Four CPU host devices for the sharding tests (tests/test_sharding.py). XLA
# reads the flag when JAX's CPU backend starts, so it is set before `import
# jax`; single-device code still runs on the first device.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
  ).strip()

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

# Programs that took >= 0.5 s to compile are kept in .jax_cache/ (or
# $BILEVEL_JAX_CACHE_DIR) and loaded by the next run of the suite, by the
# `-m extended` run after the default one and by every xdist worker;
# BILEVEL_JAX_NO_CACHE=1 turns it off. Only the first process (not an xdist
# worker) bounds the directory's size.
from experiments import jax_cache  # noqa: E402

jax_cache.enable(prune_first="PYTEST_XDIST_WORKER" not in os.environ)


# The heaviest checks (by measured duration) whose property a faster default
# test also checks: deselected by default so that `python -m pytest` stays
# under 5 minutes on 2 cores; `.ci/run` runs them in a second step
# (`python -m pytest -m extended`). Regenerate the list from
# `python -m pytest -n 2 --durations=60` when the suite's profile changes.
EXTENDED = {
  # Reproduction-run additions whose property a default test also covers: the poisoning
  # hypergradient's finite differences (the default test pins y and the
  # hypergradient against a hand-built e_alpha h), and two more ball rules (the
  # default suite checks the m = 2 polar rule's gradient and the consistency).
  "tests/test_poisoning.py::test_poisoning_hypergradient_matches_finite_differences",
  "tests/test_value_unbounded.py::test_ball_halton_wide_gaussian",
  "tests/test_value_unbounded.py::test_ball_gauss_legendre_gaussian_integral[3]",
  # Suite time after this round's additions: the default suite keeps the
  # factor option and test_implicit_at_solution's warm-adjoint check.
  "tests/test_implicit_reuse.py::test_exact_options_match_the_exact_hypergradient_and_finite_differences[pcg]",
  "tests/test_implicit_reuse.py::test_warm_adjoint_gives_the_same_gradient_in_fewer_steps",
  # The fresh-clone default run took 320 s: five more to the extended step.
  # The MAML gradient also matches hand-written descent by default; the ball
  # rule's values are checked by default; the float64 lasso path stays; the
  # warm-Newton regression joins test_warm_start_matches_cold_start there;
  # the implicit solver's docstrings already run as doctests.
  "tests/test_meta.py::test_maml_meta_gradient_matches_finite_differences",
  "tests/test_value_unbounded.py::test_ball_gradient_finite_differences",
  "tests/test_composite.py::test_lasso_path_under_jit_matches_sklearn[float32]",
  "tests/test_composite.py::test_warm_newton_through_active_set_changes_needs_no_interior_point",
  "tests/test_docs.py::test_every_code_block_of_the_docs_runs[docs/howto/regularization.md]",
  "tests/test_implicit.py::test_docstring_examples",
  "tests/test_meta.py::test_fewshot_experiment_with_an_adam_inner_loop",
  "tests/test_composite.py::test_l1_scale_is_differentiable",
  "tests/test_hypercleaning.py::test_hypergradient_matches_finite_differences",
  "bilevel_jax/_src/value/entropic.py::bilevel_jax._src.value.entropic.entropic",
  "tests/test_implicit_at_solution.py::test_float32_stays_float32",
  "tests/test_composite.py::test_success_only_below_tolerance_on_hard_cases[ipm-2]",
  "tests/test_composite.py::test_float32_elastic_net_at_small_alpha[ipm]",
  "tests/test_composite.py::test_diverging_interior_phase_keeps_its_best_iterate",
  "tests/test_bench_runner.py::test_ridge_benchmark_problem_has_the_closed_form_hypergradient",
  "tests/test_bench_runner.py::test_unrolled_cost_extrapolation_matches_the_full_unroll",
  "tests/test_docs.py::test_every_code_block_of_the_docs_runs[docs/howto/composite.md]",
  "tests/test_gradient_sampling.py::test_gradient_sampling_on_example_5_5",
  "tests/test_gradient_sampling.py::test_gradient_sampling_with_a_warm_state",
  "tests/test_docs.py::test_every_code_block_of_the_docs_runs[docs/howto/training_loop.md]",
  "bilevel_jax/_src/composite/polyhedral.py::bilevel_jax._src.composite.polyhedral.l1",
  "tests/test_composite.py::test_jacobian_minimax",
  "tests/test_bench_runner.py::test_bench_command_writes_json_markdown_and_machine",
  "bilevel_jax/_src/composite/solver.py::bilevel_jax._src.composite.solver.hypergradient",
  "tests/test_models.py::test_flax_nnx_state_with_dropout_rngs_in_bda_and_implicit",
  "tests/test_composite.py::test_optax_driver_tunes_the_l1_weight",
  "tests/test_models.py::test_equinox_mlp_as_y0_in_bda",
  "tests/test_composite.py::test_warm_start_matches_cold_start",
  "tests/test_composite.py::test_relative_interior_condition",
  "tests/test_stochastic_lower.py::test_flax_nnx_model_with_batchnorm_and_dropout",
  "tests/test_hypercleaning.py::test_cleaning_beats_uniform_weights_on_digits",
  "tests/test_meta.py::test_fewshot_experiment_runs_from_the_cli",
  "tests/test_composite.py::test_jacobian_lasso",
  "tests/test_composite.py::test_gradients_in_alpha_beta_and_data",
  "tests/test_docs.py::test_every_code_block_of_the_docs_runs[docs/howto/nonsmooth.md]",
  "tests/test_upper_step.py::test_step_vmaps_over_tasks",
  "tests/test_composite.py::test_jacobian_inequality_constrained_qp",
  "tests/test_models.py::test_jitted_make_hypergradient_and_optimize_take_an_equinox_module_as_y0",
  "tests/test_composite.py::test_unregularized_formula_matches_regularized_limit",
  "tests/test_composite.py::test_jacobian_nonlinear_G",
  "tests/test_docs.py::test_every_code_block_of_the_docs_runs[docs/howto/reweighting.md]",
  "tests/test_stochastic_lower.py::test_checkpoint_gives_the_same_gradient",
  "tests/test_stochastic_lower.py::test_equinox_mlp_with_dropout_key_in_the_batch",
  "tests/test_meta.py::test_per_task_solve_equals_joint_solve_of_the_summed_problem",
  "tests/test_value.py::test_gradient_consistency_at_the_kink[entropic]",
  "tests/test_composite.py::test_critical_cone_of_example_3_6",
  "tests/test_bench_hypercleaning_peers.py::test_small_config_skips_missing_boat",
  "tests/test_meta.py::test_meta_hypergradient_sharded_over_four_devices",
  "tests/test_composite.py::test_regularized_solution_approaches_lasso_solution",
  "tests/test_docs.py::test_every_code_block_of_the_docs_runs[docs/howto/many_problems.md]",
  "tests/test_docs.py::test_every_code_block_of_the_docs_runs[docs/howto/fewshot.md]",
  "tests/test_value.py::test_gradient_consistency_at_the_kink[quadratic]",
  "tests/test_composite.py::test_example_5_5_closed_form",
  "tests/test_docs.py::test_every_code_block_of_the_docs_runs[docs/howto/gpu.md]",
  "tests/test_composite.py::test_matrix_free_newton_matches_dense",
  "tests/test_bench_implicit_peers.py::test_small_config_skips_missing_jaxopt",
  "tests/test_value.py::test_status_and_throw_report_runtime_problems",
  "tests/test_unrolled.py::test_vmap_over_step_sizes_and_alpha_matches_loop",
  "tests/test_composite.py::test_success_only_below_tolerance_on_hard_cases[warm-100]",
  "tests/test_hypercleaning.py::test_vmap_over_datasets",
  "tests/test_composite.py::test_condition_number_grows_where_sosc_fails",
  "tests/test_composite.py::test_warm_start_falls_back_to_interior_point",
  "tests/test_unrolled.py::test_bda_agrees_with_closed_form_and_rhg_for_large_K",
  "bilevel_jax/_src/composite/solver.py::bilevel_jax._src.composite.solver.solve",
  "tests/test_composite.py::test_nonfinite_h_data",
  # the separable J^T Q J path against the dense one; by default the
  # active-set test runs warm solves on a separable G against a cold solve
  "tests/test_composite.py::test_separable_G_matches_the_dense_path[warm]",
  "tests/test_composite.py::test_separable_G_matches_the_dense_path[ipm]",
  # the new implicit options under jit/vmap/grad, the extrapolation's exact
  # starting points and the preconditioner's savings
  "tests/test_implicit_reuse.py::test_transformations_and_no_retrace",
  "tests/test_implicit_reuse.py::test_adjoint_has_the_structure_of_the_float_leaves_of_y",
  "tests/test_implicit_reuse.py::test_make_step_extrapolates_both_starts[1]",
  "tests/test_implicit_reuse.py::test_make_step_extrapolates_both_starts[2]",
  "tests/test_implicit_reuse.py::test_lbfgs_preconditioner_saves_cg_iterations",
  # the carry through make_step: by default test_optimize_carries_... checks
  # the same iterates, extrapolation and a resume through upper.optimize
  "tests/test_implicit_reuse.py::test_make_step_carries_the_adjoint_with_optax",
}


def pytest_configure(config):
  # Two xdist workers that compile the same program at once may read an entry
  # the other is still writing: JAX warns and compiles it again (harmless),
  # which must not fail the test under warnings-as-errors.
  config.addinivalue_line(
    "filterwarnings", "ignore:Error reading persistent compilation cache entry:UserWarning"
  )


def pytest_collection_modifyitems(config, items):
  import pytest

  for item in items:
    if item.nodeid in EXTENDED:
      item.add_marker(pytest.mark.extended)
