"""TF Serving's server_core_test.cc, case by case, against our ModelManager in-process.

Upstream runs ServerCore on a fake platform and on half_plus_two; here every case loads TF
Serving's real half_plus_two test models (a private copy of ../shared/tfserving-upstream) through
our manager. Cases about C++-only machinery (pre-load hooks, platform maps, request logging,
storage path prefixes, custom configs as a platform) have no counterpart and are not here.
"""

from __future__ import annotations

import pytest
from google.protobuf import text_format

from convstack.serving import model_config as mc
from convstack.serving.errors import FailedPrecondition, InvalidArgument, NotFound, ServingError
from convstack.serving.manager import ModelManager, VersionState
from tests.serving.conformance.conftest import upstream_testdata
from tests.serving.helpers import states, wait_until

pytestmark = pytest.mark.slow

NAME = "test_model"
ONE_VERSION = "saved_model_half_plus_two_cpu"  # 123
TWO_VERSIONS = "saved_model_half_plus_two_2_versions"  # 123 and 124


@pytest.fixture(scope="module")
def testdata(tmp_path_factory):
    import shutil

    copy = tmp_path_factory.mktemp("server-core") / "testdata"
    source = upstream_testdata()
    for name in (ONE_VERSION, TWO_VERSIONS):
        shutil.copytree(source / name, copy / name)
    return copy


def config(testdata, directory: str = ONE_VERSION, extra: str = "") -> mc.ModelServerConfig:
    text = (
        f'model_config_list {{ config {{ name: "{NAME}" base_path: "{testdata / directory}" '
        f'model_platform: "tensorflow" {extra} }} }}'
    )
    return text_format.Parse(text, mc.ModelServerConfig())


TWO_LATEST = "model_version_policy { latest { num_versions: 2 } }"


@pytest.fixture
def make_manager():
    managers: list[ModelManager] = []

    def make(server_config, **options) -> ModelManager:
        options = {"file_system_poll_wait_seconds": 0.05, "max_num_load_retries": 0, **options}
        manager = ModelManager(server_config, **options)
        managers.append(manager)
        return manager

    yield make
    for manager in managers:
        manager.stop()


def served(manager, **spec) -> int:
    with manager.acquire(NAME, **spec) as loaded:
        return loaded.version


def available(manager) -> list[int]:
    return sorted(v for v, state in states(manager, NAME).items() if state == "AVAILABLE")


def test_create_waits_till_models_available(testdata, make_manager):
    """ServerCoreTest.CreateWaitsTillModelsAvailable."""
    manager = make_manager(config(testdata))
    manager.start()
    assert available(manager) == [123]
    assert served(manager, version=123) == 123
    assert manager.model_status(NAME)[0].error_code == "OK"


def test_reload_config_waits_till_models_available(testdata, make_manager):
    """ServerCoreTest.ReloadConfigWaitsTillModelsAvailable: from no models to one."""
    manager = make_manager(mc.ModelServerConfig())
    manager.start()
    manager.reload_config(config(testdata))
    assert available(manager) == [123]


def test_reload_config_unloads_models(testdata, make_manager):
    """ServerCoreTest.ReloadConfigUnloadsModels: an empty list unloads; the version ends END."""
    manager = make_manager(config(testdata))
    manager.start()
    empty = mc.ModelServerConfig()
    empty.model_config_list.SetInParent()
    manager.reload_config(empty)
    wait_until(lambda: states(manager, NAME) == {123: "END"}, "version 123 to end")
    with pytest.raises(NotFound):
        served(manager)


def test_reload_config_handles_loading_a_previously_unloaded_model(testdata, make_manager):
    """ServerCoreTest.ReloadConfigHandlesLoadingAPreviouslyUnloadedModel."""
    manager = make_manager(config(testdata))
    manager.start()
    manager.reload_config(mc.ModelServerConfig())
    wait_until(lambda: states(manager, NAME).get(123) == "END", "version 123 to end")
    manager.reload_config(config(testdata))
    assert available(manager) == [123]
    assert served(manager) == 123


def test_reload_config_change_model_base_path(testdata, make_manager):
    """ServerCoreTest.ReloadConfigChangeModelBasePath: to a path with 123 and 124, then back."""
    manager = make_manager(config(testdata))
    manager.start()
    assert served(manager) == 123
    manager.reload_config(config(testdata, TWO_VERSIONS))
    wait_until(lambda: served(manager) == 124, "the two-version path to serve 124")
    manager.reload_config(config(testdata))
    wait_until(lambda: served(manager) == 123, "the one-version path to serve 123 again")


@pytest.mark.parametrize(
    ("base_path", "extra", "message"),
    [
        ("relative/half_plus_two", "", "to have an absolute path or URI"),
        (None, "model_type: TENSORFLOW", "sets both model_type (deprecated) and model_platform"),
    ],
    ids=["RelativePathFails", "IllegalConfigModelTypeAndPlatformSet"],
)
def test_invalid_configs_are_refused(testdata, base_path, extra, message):
    """RelativePathsServerCoreTest.RelativePathFails and
    ServerCoreTest.IllegalConfigModelTypeAndPlatformSet (INVALID_ARGUMENT upstream)."""
    server_config = config(testdata, extra=extra)
    if base_path is not None:
        server_config.model_config_list.config[0].base_path = base_path
    with pytest.raises(mc.ModelConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        mc.validate_model_config(server_config)


def test_duplicate_model_name_in_config(testdata):
    """ServerCoreTest.DuplicateModelNameInConfig."""
    server_config = config(testdata)
    server_config.model_config_list.config.add().CopyFrom(server_config.model_config_list.config[0])
    with pytest.raises(mc.ModelConfigError, match="multiple times"):
        mc.validate_model_config(server_config)


def test_unknown_model_platform(testdata):
    """ServerCoreTest.UnknownModelPlatform."""
    server_config = config(testdata)
    server_config.model_config_list.config[0].model_platform = "not_a_known_platform"
    with pytest.raises(mc.ModelConfigError, match="not_a_known_platform"):
        mc.validate_model_config(server_config)


def test_deprecated_model_type_config(testdata, make_manager):
    """ServerCoreTest.DeprecatedModelTypeConfig: model_type TENSORFLOW without a platform
    still serves."""
    server_config = config(testdata)
    entry = server_config.model_config_list.config[0]
    entry.model_platform = ""
    entry.model_type = 1  # ModelType.TENSORFLOW
    mc.validate_model_config(server_config)
    manager = make_manager(server_config)
    manager.start()
    assert available(manager) == [123]


def test_illegal_reconfiguration_to_custom_config(testdata, make_manager):
    """ServerCoreTest.IllegalReconfigurationToCustomConfig: refused (upstream says "Cannot
    transition to requested config"; custom configs are not supported here at all)."""
    manager = make_manager(config(testdata))
    manager.start()
    custom = mc.ModelServerConfig()
    custom.custom_model_config.SetInParent()
    with pytest.raises((InvalidArgument, mc.ModelConfigError)):
        manager.reload_config(custom)
    assert available(manager) == [123]


def test_erroring_model(testdata, make_manager, tmp_path):
    """ServerCoreTest.ErroringModel: a version that cannot load fails start-up, and its state
    is END with the error (upstream injects the error in the source adapter; here the
    SavedModel is garbage)."""
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(testdata / ONE_VERSION, broken)
    (broken / "00000123" / "saved_model.pb").write_bytes(b"not a SavedModel")
    server_config = config(testdata)
    server_config.model_config_list.config[0].base_path = str(broken)
    manager = make_manager(server_config)
    with pytest.raises(ServingError, match=r"^1 servable\(s\) did not become available: \{"):
        manager.start()
    status = manager.model_status(NAME)
    assert [(s.version, s.state) for s in status] == [(123, VersionState.END)]
    assert status[0].error_code != "OK" and "saved_model.pb" in status[0].error_message


def test_model_spec_multiple_versions_available(testdata, make_manager):
    """ServerCoreTest.ModelSpecMultipleVersionsAvailable: latest, a version, labels A and B,
    and an unknown label."""
    manager = make_manager(config(testdata, TWO_VERSIONS, TWO_LATEST))
    manager.start()
    wait_until(lambda: available(manager) == [123, 124], "both versions")
    assert served(manager) == 124
    assert served(manager, version=123) == 123
    labelled = 'version_labels { key: "A" value: 123 } version_labels { key: "B" value: 124 }'
    manager.reload_config(config(testdata, TWO_VERSIONS, f"{TWO_LATEST} {labelled}"))
    assert served(manager, label="A") == 123
    assert served(manager, label="B") == 124
    with pytest.raises(InvalidArgument, match="Unrecognized servable version label"):
        served(manager, label="nonexistent label")


def _two_versions_with_labels(testdata, make_manager, labels: str, **options):
    manager = make_manager(config(testdata, TWO_VERSIONS, TWO_LATEST), **options)
    manager.start()
    wait_until(lambda: available(manager) == [123, 124], "both versions")
    if labels:
        manager.reload_config(config(testdata, TWO_VERSIONS, f"{TWO_LATEST} {labels}"))
    return manager


BOGUS = 'version_labels { key: "nice try" value: 9999 }'
A_AND_B = 'version_labels { key: "A" value: 123 } version_labels { key: "B" value: 124 }'


def test_assign_label_to_unavailable_version(testdata, make_manager):
    """ServerCoreTest.AssignLabelToUnavailableVersion."""
    manager = _two_versions_with_labels(testdata, make_manager, "")
    with pytest.raises(FailedPrecondition, match="not currently available for inference"):
        manager.reload_config(config(testdata, TWO_VERSIONS, f"{TWO_LATEST} {BOGUS}"))


def test_assign_label_to_unavailable_version_allowed(testdata, make_manager):
    """ServerCoreTest.AssignLabelToUnavailableVersionAllowed."""
    manager = _two_versions_with_labels(
        testdata, make_manager, "", allow_version_labels_for_unavailable_models=True
    )
    manager.reload_config(config(testdata, TWO_VERSIONS, f"{TWO_LATEST} {BOGUS}"))
    assert manager.labels(NAME) == {"nice try": 9999}


def test_assign_existing_label_to_unavailable_version_disallowed(testdata, make_manager):
    """ServerCoreTest.AssignExistingLabelToUnavailableVersionDisallowed: even with the flag,
    an existing label never moves onto a version that cannot serve."""
    manager = _two_versions_with_labels(
        testdata, make_manager, A_AND_B, allow_version_labels_for_unavailable_models=True
    )
    moved = 'version_labels { key: "A" value: 9999 } version_labels { key: "B" value: 124 }'
    with pytest.raises(FailedPrecondition, match="not currently available for inference"):
        manager.reload_config(config(testdata, TWO_VERSIONS, f"{TWO_LATEST} {moved}"))
    assert manager.labels(NAME) == {"A": 123, "B": 124}
