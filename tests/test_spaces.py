import optuna
import pytest
from ray.tune.search.optuna import OptunaSearch

from tuning.config import METRIC, MODE, TrialConfig
from tuning.spaces import SpaceError, load_space, parse_space, shipped_spaces

CONSTANTS = {"epochs": 3, "num_classes": 10}


def test_the_three_spaces_ship_as_package_data():
    assert {"allconv", "paper", "smoke"} <= set(shipped_spaces())


@pytest.mark.parametrize("name", ["allconv", "paper", "smoke"])
def test_hundreds_of_sampled_configs_stay_in_bounds(name):
    space = load_space(name)
    study = optuna.create_study(direction="maximize", sampler=space.optuna_sampler(seed=1))
    for point in space.first_points():
        study.enqueue_trial(point)
    dims = {dim.key: dim for dim in space.dimensions}
    for i in range(300):
        trial = study.ask()
        config = {**trial.params, **space.suggest(trial, CONSTANTS)}
        for key, value in trial.params.items():
            assert dims[key].contains(value), (key, value)
        assert config | space.fixed == config
        TrialConfig.from_dict(config)  # a trial can take every sampled config
        study.tell(trial, (i * 7919 % 101) / 101)


def test_the_paper_grid_runs_every_point_first():
    space = load_space("paper")
    assert space.grid_size == 16
    points = space.first_points()
    assert len({tuple(sorted(p.items())) for p in points}) == 16
    variants = {(p["downsample"], p["convs_per_stage"]) for p in points}
    assert variants == {("stride", 1), ("stride", 2), ("pool", 1), ("pool", 2)}
    assert {p["lr"] for p in points} == {0.25, 0.1, 0.05, 0.01}


def test_conditional_param_is_sampled_only_when_switched_on():
    space = load_space("allconv")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = {True: 0, False: 0}
    for _ in range(100):
        trial = study.ask()
        space.suggest(trial, CONSTANTS)
        assert ("stage_dropout" in trial.params) == (trial.params["batchnorm"] is False)
        seen[trial.params["batchnorm"]] += 1
        study.tell(trial, 0.5)
    assert min(seen.values()) > 10


def proposals(seed: int, n: int = 6) -> list[dict]:
    space = load_space("allconv")
    searcher = OptunaSearch(space=space.define_by_run(CONSTANTS), metric=METRIC, mode=MODE,
                            sampler=space.optuna_sampler(seed))  # fmt: skip
    configs = []
    for i in range(n):
        configs.append(searcher.suggest(f"t{i}"))
        searcher.on_trial_complete(f"t{i}", {METRIC: 0.1 * (i % 3), "training_iteration": 1})
    return configs


def test_the_same_seed_proposes_the_same_configs():
    assert proposals(seed=3) == proposals(seed=3)
    assert proposals(seed=3) != proposals(seed=4)


VALID = """
params:
  lr: {loguniform: [0.01, 1.0]}
  batchnorm: {choice: [true, false]}
fixed:
  preset: seed
"""

BROKEN = {
    "syntax": ("params:\n  lr: {loguniform: [0.01, 1.0]\n", "line"),
    "unknown parameter": ("params:\n  learning_rate: {uniform: [0.1, 0.2]}\n", "params.learning_rate"),
    "low >= high": ("params:\n  lr: {uniform: [0.5, 0.1]}\n", "params.lr"),
    "log range with low <= 0": ("params:\n  weight_decay: {loguniform: [0, 0.01]}\n", "params.weight_decay"),
    "unknown distribution": ("params:\n  lr: {normal: [0.1, 0.2]}\n", "params.lr"),
    "zero channels": ("params:\n  width_mult: {uniform: [0, 2]}\n", "params.width_mult"),
    "dropout >= 1": ("params:\n  stage_dropout: {uniform: [0.0, 1.0]}\n", "params.stage_dropout"),
    "impossible choice": ("params:\n  downsample: {choice: [stride, avg]}\n", "params.downsample"),
    "range on a choice param": ("params:\n  optimizer: {uniform: [0, 1]}\n", "params.optimizer"),
    "int on a float param": ("params:\n  lr: {int: [1, 3]}\n", "params.lr"),
    "two distributions": ("params:\n  lr: {uniform: [0.1, 0.2], loguniform: [0.1, 0.2]}\n", "params.lr"),
    "not a mapping": ("params:\n  lr: 0.1\n", "params.lr"),
    "bad fixed value": ("params:\n  lr: {uniform: [0.1, 0.2]}\nfixed:\n  batch_size: 0\n", "fixed.batch_size"),
    "set by the search": ("params:\n  epochs: {int: [1, 5]}\n", "params.epochs"),
    "in params and fixed": ("params:\n  lr: {uniform: [0.1, 0.2]}\nfixed:\n  lr: 0.1\n", "params.lr"),
    "unknown top-level key": ("param:\n  lr: {uniform: [0.1, 0.2]}\n", "param"),
    "no params": ("fixed:\n  lr: 0.1\n", "params"),
    "when on a later param": ("params:\n  stage_dropout: {uniform: [0, 0.5], when: {batchnorm: false}}\n  batchnorm: {choice: [true, false]}\n", "params.stage_dropout"),
    "when value not a choice": ("params:\n  batchnorm: {choice: [true]}\n  stage_dropout: {uniform: [0, 0.5], when: {batchnorm: false}}\n", "params.stage_dropout"),
    "grid with a range": ("sampler: grid\nparams:\n  lr: {uniform: [0.1, 0.2]}\n", "params.lr"),
    "unknown sampler": ("sampler: cmaes\nparams:\n  lr: {uniform: [0.1, 0.2]}\n", "sampler"),
    "baseline outside the range": ("params:\n  lr: {uniform: [0.1, 0.2]}\nbaseline:\n  lr: 0.5\n", "baseline.lr"),
    "not a mapping at all": ("- lr\n- momentum\n", "mapping"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_file_names_the_file_and_the_key(tmp_path, case):
    text, key = BROKEN[case]
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(SpaceError) as err:
        load_space(path)
    assert str(path) in str(err.value) and key in str(err.value)


def test_a_valid_file_loads_with_numbers_written_the_yaml_way(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(VALID.replace("0.01", "1e-2"))  # YAML 1.1 reads 1e-2 as a string
    space = load_space(path)
    assert space.dimensions[0].low == 0.01 and space.fixed == {"preset": "seed"} and space.text == path.read_text()


def test_a_missing_file_or_name_is_named(tmp_path):
    with pytest.raises(SpaceError, match="nope.yaml"):
        load_space(tmp_path / "nope.yaml")
    with pytest.raises(SpaceError, match="'nope'.*allconv"):
        load_space("nope")


def test_parse_space_reads_text_directly():
    space = parse_space(VALID, source="inline", name="inline")
    assert [d.key for d in space.dimensions] == ["lr", "batchnorm"] and space.sampler == "tpe"
