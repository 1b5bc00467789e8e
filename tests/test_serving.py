"""The policy server and the openpi client adapter, end to end on loopback.

Every test starts a real server on 127.0.0.1 (free port) with a small deterministic linear policy that counts
its calls and batch sizes, and talks to it with the client adapter or a raw ``websockets`` connection.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from policies.base import ActionChunk, Observation, ObservationBatch, Policy, stack_observations
from policies.openpi_client import AuthenticationError, OpenPIClientPolicy, ServerError
from policies.serving import (
    BackgroundServer,
    ObservationError,
    ObservationKeys,
    ObservationSpec,
    PolicyServer,
    RTCRequest,
    ServerConfig,
    msgpack_numpy,
    observation_from_wire,
)
from policies.serving.observations import observation_to_wire

HORIZON, ACTION_DIM, STATE_DIM, IMAGE = 5, 4, 3, (8, 8)


class LinearPolicy:
    """actions[b, h, d] = scale · (state · w_hd + mean pixel of each camera); counts calls and batch sizes.

    ``infer_started`` is set when an inference begins; ``sleep_s`` makes it slow; ``release`` (when given)
    holds every inference until set.
    """

    def __init__(self, version: str = "linear-v1", scale: float = 1.0, cameras: tuple[str, ...] = ("main",)):
        self.version = version
        self.action_horizon = HORIZON
        self.action_dim = ACTION_DIM
        self.cameras = cameras
        self.image_size = IMAGE
        self.state_dim = STATE_DIM
        self.scale = scale
        self.weights = (
            np.random.default_rng(0).normal(size=(STATE_DIM, HORIZON * ACTION_DIM)).astype(np.float32)
        )
        self.sleep_s = 0.0
        self.release: threading.Event | None = None
        self.infer_started = threading.Event()
        self.calls = 0
        self.batch_sizes: list[int] = []
        self.saw_privileged = False

    def infer(self, batch: ObservationBatch) -> ActionChunk:
        self.infer_started.set()
        self.calls += 1
        self.batch_sizes.append(len(batch["prompt"]))
        self.saw_privileged |= "privileged" in batch
        if self.release is not None:
            self.release.wait(10)
        time.sleep(self.sleep_s)
        pixels = sum(images.reshape(len(images), -1).mean(axis=1) for images in batch["images"].values())
        flat = batch["state"] @ self.weights + pixels[:, None] / 255.0
        return ActionChunk(actions=(self.scale * flat).reshape(-1, HORIZON, ACTION_DIM).astype(np.float32))

    def reset(self) -> None:
        pass


def make_observation(seed: int = 0, cameras: tuple[str, ...] = ("main",)) -> Observation:
    rng = np.random.default_rng(seed)
    return Observation(
        images={camera: rng.integers(0, 256, size=(*IMAGE, 3), dtype=np.uint8) for camera in cameras},
        state=rng.normal(size=STATE_DIM).astype(np.float32),
        prompt="push the puck",
    )


def expected_actions(policy: LinearPolicy, observation: Observation) -> np.ndarray:
    return policy.infer(stack_observations([observation])).actions[0]


@pytest.fixture
def policy() -> LinearPolicy:
    return LinearPolicy()


def start(policy: Policy, **config: object) -> BackgroundServer:
    return BackgroundServer(PolicyServer(policy, ServerConfig(port=0, **config))).start()


@pytest.fixture
def served(policy: LinearPolicy) -> Iterator[BackgroundServer]:
    with start(policy, max_wait_ms=20.0) as background:
        yield background


def raw_connect(url: str, **kwargs: object) -> tuple[ClientConnection, dict]:
    connection = connect(url, compression=None, open_timeout=5, **kwargs)
    return connection, msgpack_numpy.unpackb(connection.recv(timeout=5))


def health(background: BackgroundServer, timeout_s: float = 5.0) -> tuple[int, str]:
    url = f"http://127.0.0.1:{background.server.port}/healthz"
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return response.status, response.read().decode()


def test_client_gets_actions_with_shape_values_and_version(policy: LinearPolicy, served) -> None:
    observation = make_observation(1)
    with OpenPIClientPolicy(served.url) as client:
        assert (client.version, client.action_horizon, client.action_dim) == (
            "linear-v1",
            HORIZON,
            ACTION_DIM,
        )
        assert client.metadata["cameras"] == {"main": [8, 8, 3]} and client.metadata["state_dim"] == STATE_DIM
        chunk = client.infer(stack_observations([observation, make_observation(2)]))
        reply = client.infer_one(observation)
    assert isinstance(client, Policy)
    assert chunk.actions.shape == (2, HORIZON, ACTION_DIM) and chunk.actions.dtype == np.float32
    np.testing.assert_allclose(chunk.actions[0], expected_actions(policy, observation), rtol=1e-5)
    assert reply["policy_version"] == "linear-v1" and reply["server_timing"]["infer_ms"] >= 0
    assert chunk.timing["round_trip_ms"] >= chunk.timing["server_infer_ms"] >= 0


def test_healthz_answers_ok(served) -> None:
    assert health(served) == (200, "OK\n")


def test_health_check_answers_while_a_slow_inference_runs(policy: LinearPolicy, served) -> None:
    policy.release = threading.Event()
    client = OpenPIClientPolicy(served.url)
    worker = threading.Thread(target=client.infer_one, args=(make_observation(),))
    worker.start()
    assert policy.infer_started.wait(5)
    assert health(served, timeout_s=2.0) == (200, "OK\n")
    with OpenPIClientPolicy(served.url) as other:  # a second client connects and gets its metadata too
        assert other.version == "linear-v1"
    assert worker.is_alive(), "the inference was still blocked while both answered"
    policy.release.set()
    worker.join(5)
    client.close()


@pytest.mark.parametrize(
    "header", [None, "Api-Key wrong", "Bearer s3cret", "Api-Key s3cre", "api-key s3cret"]
)
def test_missing_or_wrong_api_key_is_rejected_before_inference(policy: LinearPolicy, header) -> None:
    with start(policy, api_key="s3cret") as background:
        headers = {"Authorization": header} if header else None
        with pytest.raises(InvalidStatus) as rejected:
            connect(background.url, additional_headers=headers, open_timeout=5)
        assert rejected.value.response.status_code == 401
        with pytest.raises(AuthenticationError, match="401"):
            OpenPIClientPolicy(background.url, api_key="wrong", connect_timeout_s=2)
        assert policy.calls == 0
        with OpenPIClientPolicy(background.url, api_key="s3cret") as client:
            assert client.infer_one(make_observation())["policy_version"] == "linear-v1"
        assert policy.calls == 1
        stats_url = f"http://127.0.0.1:{background.server.port}/stats"
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(stats_url, timeout=5)
        request = urllib.request.Request(stats_url, headers={"Authorization": "Api-Key s3cret"})
        with urllib.request.urlopen(request, timeout=5) as response:
            stats = json.loads(response.read())
        assert stats["policy_version"] == "linear-v1" and stats["requests"] == 1


def _assert_error_then_close(connection: ClientConnection, *fragments: str) -> str:
    text = connection.recv(timeout=5)
    assert isinstance(text, str), "errors come as a text frame"
    for fragment in fragments:
        assert fragment in text
    with pytest.raises(ConnectionClosed) as closed:
        connection.recv(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
    return text


def _assert_still_serves(background: BackgroundServer) -> None:
    with OpenPIClientPolicy(background.url) as client:
        assert client.infer_one(make_observation(9))["actions"].shape == (HORIZON, ACTION_DIM)


def test_malformed_msgpack_gets_a_one_line_error_and_server_stays_up(policy: LinearPolicy, served) -> None:
    connection, _ = raw_connect(served.url)
    connection.send(b"\xc1\xc1 not msgpack")
    text = _assert_error_then_close(connection, "WireFormatError", "not valid msgpack")
    assert "\n" not in text and "Traceback" not in text
    assert policy.calls == 0
    _assert_still_serves(served)


@pytest.mark.parametrize(
    ("mutate", "fragments"),
    [
        (lambda m: m["images"].update(main=np.zeros((9, 8, 3), np.uint8)), ["images['main']", "(8, 8, 3)"]),
        (lambda m: m["images"].update(main=np.zeros((8, 8, 3), np.float32)), ["images['main']", "uint8"]),
        (lambda m: m["images"].update(side=np.zeros((8, 8, 3), np.uint8)), ["images:", "['main']"]),
        (lambda m: m.update(state=np.zeros(7, np.float32)), ["state", "expected (3,)"]),
        (lambda m: m.update(state=np.array([np.nan, 0, 0], np.float32)), ["state", "NaN"]),
        (lambda m: m.pop("prompt"), ["prompt", "expected a str"]),
        (lambda m: m["images"].update({b"main": m["images"]["main"]}), ["camera names must be str"]),
    ],
)
def test_wrong_fields_get_an_error_naming_the_field(policy: LinearPolicy, served, mutate, fragments) -> None:
    message = observation_to_wire(make_observation())
    mutate(message)
    connection, _ = raw_connect(served.url)
    connection.send(msgpack_numpy.packb(message))
    _assert_error_then_close(connection, "ObservationError", *fragments)
    assert policy.calls == 0
    _assert_still_serves(served)


def test_privileged_state_is_refused_unless_the_server_allows_it(policy: LinearPolicy, served) -> None:
    observation = make_observation()
    observation["privileged"] = np.zeros(39, np.float32)
    with OpenPIClientPolicy(served.url, send_privileged=True) as client:
        with pytest.raises(ServerError, match="privileged: refused"):
            client.infer_one(observation)
        client.send_privileged = False  # the next request reconnects and is served
        assert client.infer_one(observation)["actions"].shape == (HORIZON, ACTION_DIM)
    assert not policy.saw_privileged
    with (
        start(policy, allow_privileged=True) as background,
        OpenPIClientPolicy(background.url, send_privileged=True) as client,
    ):
        client.infer_one(observation)
    assert policy.saw_privileged


def test_text_frame_is_refused(served) -> None:
    connection, _ = raw_connect(served.url)
    connection.send("hello")
    _assert_error_then_close(connection, "binary msgpack frame")
    _assert_still_serves(served)


def test_debug_setting_sends_tracebacks(policy: LinearPolicy) -> None:
    with start(policy, debug=True) as background:
        connection, _ = raw_connect(background.url)
        connection.send(b"\xc1")
        assert "Traceback" in _assert_error_then_close(connection, "WireFormatError")


def test_oversized_frame_is_refused_and_server_stays_up(policy: LinearPolicy) -> None:
    with start(policy, max_message_bytes=4096) as background:
        big = make_observation()
        big["images"]["main"] = np.zeros((64, 64, 3), np.uint8)
        with OpenPIClientPolicy(background.url) as client, pytest.raises(ServerError, match="too big"):
            client.infer_one(big)
        assert policy.calls == 0
        _assert_still_serves(background)


def test_failing_policy_reports_error_and_server_stays_up(policy: LinearPolicy, served) -> None:
    policy.weights = policy.weights[:, :3]  # the reshape inside infer now fails
    connection, _ = raw_connect(served.url)
    connection.send(msgpack_numpy.packb(observation_to_wire(make_observation())))
    _assert_error_then_close(connection, "InferenceError", "linear-v1 failed")
    policy.weights = LinearPolicy().weights
    _assert_still_serves(served)


def test_client_vanishing_mid_request_does_not_break_the_server(policy: LinearPolicy, served) -> None:
    policy.release = threading.Event()
    connection, _ = raw_connect(served.url)
    connection.send(msgpack_numpy.packb(observation_to_wire(make_observation())))
    assert policy.infer_started.wait(5)
    connection.socket.close()  # gone without a close handshake while its inference runs
    policy.release.set()
    _assert_still_serves(served)
    assert health(served) == (200, "OK\n")


def _stall_mid_frame(port: int) -> socket.socket:
    """Open a WebSocket by hand and send half a frame, then stall (a slow or stuck client)."""
    stalled = socket.create_connection(("127.0.0.1", port), timeout=5)
    stalled.sendall(
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    response = b""
    while b"\r\n\r\n" not in response:
        response += stalled.recv(4096)
    assert response.startswith(b"HTTP/1.1 101")
    stalled.sendall(
        b"\x82\xfe\x03\xe8" + b"mask" + b"x" * 10
    )  # binary, masked, 1000 bytes announced, 10 sent
    return stalled


def test_slow_clients_do_not_hold_up_others(policy: LinearPolicy, served) -> None:
    stalled = _stall_mid_frame(served.server.port)
    deaf, _ = raw_connect(served.url)  # sends requests but never reads the replies
    for seed in range(3):
        deaf.send(msgpack_numpy.packb(observation_to_wire(make_observation(seed))))
    _assert_still_serves(served)
    assert health(served) == (200, "OK\n")
    stalled.close()
    deaf.close()


def _hold_until_queued(policy: LinearPolicy, server: PolicyServer, requests: int) -> threading.Thread:
    """Hold the first inference until ``requests`` requests are in flight, so the next batch must hold the
    others (makes batching deterministic however slowly the client threads are scheduled)."""
    policy.release = threading.Event()

    def release() -> None:
        deadline = time.monotonic() + 20
        while server.stats()["in_flight"] < requests and time.monotonic() < deadline:
            time.sleep(0.005)
        assert policy.release is not None
        policy.release.set()

    releaser = threading.Thread(target=release)
    releaser.start()
    return releaser


def test_concurrent_clients_are_batched(policy: LinearPolicy, served) -> None:
    clients = [OpenPIClientPolicy(served.url) for _ in range(4)]
    results: dict[int, list[np.ndarray]] = {}

    def run(index: int) -> None:
        results[index] = [clients[index].infer_one(make_observation(index))["actions"] for _ in range(3)]

    releaser = _hold_until_queued(policy, served.server, 4)
    threads = [threading.Thread(target=run, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in [*threads, releaser]:
        thread.join(30)
    assert max(policy.batch_sizes) > 1 and sum(policy.batch_sizes) == 12
    stats = served.server.stats()
    assert stats["requests"] == 12 and stats["largest_batch"] == max(policy.batch_sizes)
    for index in range(4):  # each client got the answer to its own observation
        for actions in results[index]:
            np.testing.assert_allclose(actions, expected_actions(policy, make_observation(index)), rtol=1e-5)
    for client in clients:
        client.close()


def test_client_spreads_a_batch_over_connections_and_keeps_the_order(policy: LinearPolicy, served) -> None:
    observations = [make_observation(seed) for seed in range(8)]
    with OpenPIClientPolicy(served.url, connections=4) as client:
        releaser = _hold_until_queued(policy, served.server, 4)
        chunk = client.infer(stack_observations(observations))
        releaser.join(30)
    assert max(policy.batch_sizes) > 1 and sum(policy.batch_sizes) == 8
    for index, observation in enumerate(observations):
        np.testing.assert_allclose(chunk.actions[index], expected_actions(policy, observation), rtol=1e-5)


def test_hot_swap_changes_version_without_dropping_the_connection(policy: LinearPolicy, served) -> None:
    observation = make_observation(3)
    with OpenPIClientPolicy(served.url) as client:
        before = client.infer(stack_observations([observation]))
        connection = client._channels[0].connection
        new_policy = LinearPolicy(version="linear-v2", scale=2.0)
        served.server.swap_policy(new_policy)
        after = client.infer(stack_observations([observation]))
        assert client._channels[0].connection is connection, "the same connection carried both requests"
        assert client.version == "linear-v2" and new_policy.calls == 1
    np.testing.assert_allclose(after.actions, 2.0 * before.actions, rtol=1e-5)
    with OpenPIClientPolicy(served.url) as late:
        assert late.metadata["policy_version"] == "linear-v2"


def test_hot_swap_refuses_a_policy_that_would_break_connected_clients(served) -> None:
    other_cameras = LinearPolicy(version="two-cameras", cameras=("main", "wrist"))
    with pytest.raises(ValueError, match="expects"):
        served.server.swap_policy(other_cameras)
    longer = LinearPolicy(version="longer")
    longer.action_horizon = HORIZON + 1
    with pytest.raises(ValueError, match="action shape"):
        served.server.swap_policy(longer)
    assert served.server.policy.version == "linear-v1"


def _wait_until_not_listening(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except (ConnectionRefusedError, ConnectionResetError):  # reset: the listener closed mid-handshake
            return
        time.sleep(0.01)
    raise AssertionError(f"port {port} still accepts connections")


def test_graceful_shutdown_finishes_in_flight_then_closes_with_1001(policy: LinearPolicy) -> None:
    policy.release = threading.Event()
    background = start(policy)
    connection, _ = raw_connect(background.url)
    connection.send(msgpack_numpy.packb(observation_to_wire(make_observation())))
    assert policy.infer_started.wait(5)
    stopper = threading.Thread(target=background.stop)
    stopper.start()
    _wait_until_not_listening(background.server.port)  # shutdown has begun while the inference is held
    policy.release.set()
    reply = msgpack_numpy.unpackb(connection.recv(timeout=5))
    assert reply["actions"].shape == (HORIZON, ACTION_DIM)
    with pytest.raises(ConnectionClosed) as closed:
        connection.recv(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    stopper.join(10)
    with pytest.raises(urllib.error.URLError):
        health(background, timeout_s=1.0)


def test_openpi_style_field_names_round_trip(policy: LinearPolicy) -> None:
    """A client using openpi's LIBERO keys talks to a server configured with the same key map."""
    keys = ObservationKeys.libero("main", "wrist")
    two_camera = LinearPolicy(cameras=("main", "wrist"))
    observation = make_observation(4, cameras=("main", "wrist"))
    wire = observation_to_wire(observation, keys)
    assert sorted(wire) == ["observation/image", "observation/state", "observation/wrist_image", "prompt"]
    with start(two_camera, keys=keys) as background, OpenPIClientPolicy(background.url, keys=keys) as client:
        chunk = client.infer(stack_observations([observation]))
    np.testing.assert_allclose(chunk.actions[0], expected_actions(two_camera, observation), rtol=1e-5)


def test_client_retries_until_the_server_comes_up(policy: LinearPolicy) -> None:
    port = _free_port()
    background = BackgroundServer(PolicyServer(policy, ServerConfig(port=port)))
    timer = threading.Timer(0.5, background.start)
    timer.start()
    with OpenPIClientPolicy(f"ws://127.0.0.1:{port}", retry_interval_s=0.1, connect_timeout_s=10) as client:
        assert client.version == "linear-v1"
    timer.join()
    background.stop()


def _free_port() -> int:
    """A port that was free a moment ago (nothing listens on it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_client_gives_up_after_connect_timeout() -> None:
    with pytest.raises(ServerError, match="could not connect"):
        OpenPIClientPolicy(f"ws://127.0.0.1:{_free_port()}", connect_timeout_s=0.5, retry_interval_s=0.1)


def test_server_binds_loopback_by_default() -> None:
    assert ServerConfig().host == "127.0.0.1"
    with pytest.raises(ValueError, match="max_batch"):
        ServerConfig(max_batch=0)


def _tiny_vla() -> Policy:
    vla = pytest.importorskip("policies.vla")
    from policies.normalization import NormalizationStats

    rng = np.random.default_rng(0)
    tokenizer = vla.train_prompt_tokenizer(["push the puck"], vocab_size=96)
    config = vla.VLAConfig.preset("tiny", image_size=48, num_steps=2, vocab_size=tokenizer.get_vocab_size())
    stats = NormalizationStats.compute(
        rng.normal(size=(64, config.state_dim)).astype(np.float32),
        rng.normal(size=(64, config.action_horizon, config.action_dim)).astype(np.float32),
    )
    return vla.VLAPolicy(vla.VLAModel(config), tokenizer, stats, version="vla-tiny-test")


def test_serves_the_built_in_vla_with_embeddings() -> None:
    """The server reads the VLA's cameras, image size and state size from its config and forwards embeddings."""
    policy = _tiny_vla()
    rng = np.random.default_rng(1)
    observation = Observation(
        images={"corner": rng.integers(0, 256, size=(48, 48, 3), dtype=np.uint8)},
        state=rng.normal(size=4).astype(np.float32),
        prompt="push the puck",
    )
    with start(policy, send_embeddings=True) as background, OpenPIClientPolicy(background.url) as client:
        assert client.metadata["cameras"] == {"corner": [48, 48, 3]} and client.metadata["state_dim"] == 4
        chunk = client.infer(stack_observations([observation, observation]))
        wrong = dict(observation, images={"corner": np.zeros((96, 96, 3), np.uint8)})
        with pytest.raises(
            ServerError, match=r"images\['corner'\]: shape \(96, 96, 3\), expected \(48, 48, 3\)"
        ):
            client.infer_one(wrong)
    assert chunk.actions.shape == (2, policy.action_horizon, policy.action_dim)
    assert chunk.embeddings is not None and chunk.embeddings.shape[0] == 2 and chunk.embeddings.ndim == 3


def test_droid_key_map_splits_and_joins_the_state() -> None:
    keys = ObservationKeys.droid("exterior", "wrist")
    observation = make_observation(5, cameras=("exterior", "wrist"))
    observation["state"] = np.arange(8, dtype=np.float32)
    wire = observation_to_wire(observation, keys)
    np.testing.assert_array_equal(wire["observation/joint_position"], np.arange(7))
    np.testing.assert_array_equal(wire["observation/gripper_position"], [7])
    spec = ObservationSpec(cameras={"exterior": IMAGE, "wrist": IMAGE}, state_dim=8)
    back = observation_from_wire(msgpack_numpy.unpackb(msgpack_numpy.packb(wire)), spec, keys)
    np.testing.assert_array_equal(back["state"], observation["state"])
    np.testing.assert_array_equal(back["images"]["wrist"], observation["images"]["wrist"])
    wire["observation/gripper_position"] = np.zeros(2, np.float32)
    with pytest.raises(
        ObservationError, match=r"observation/gripper_position: expected a float array of shape \(1,\)"
    ):
        observation_from_wire(wire, spec, keys)


def test_key_map_parses_from_command_line_entries() -> None:
    libero = ["image:main=observation/image", "image:wrist=observation/wrist_image"]
    assert ObservationKeys.parse(libero) == ObservationKeys.libero("main", "wrist")
    droid = [
        "image:exterior=observation/exterior_image_1_left",
        "image:wrist=observation/wrist_image_left",
        "state=observation/joint_position:7,observation/gripper_position:1",
    ]
    assert ObservationKeys.parse(droid) == ObservationKeys.droid("exterior", "wrist")
    for bad, message in [
        (["state=observation/state"], "at least one image"),
        (["image:main"], "expected NAME=WIRE_KEY"),
        (["camera:main=x"], "NAME must be"),
        (["image:main=x", "state=a:0"], "<wire key>:<length>"),
    ]:
        with pytest.raises(ValueError, match=message):
            ObservationKeys.parse(bad)


@pytest.fixture(scope="module")
def rtc_vla() -> Policy:
    from tests.test_rtc import tiny_vla

    return tiny_vla()


def _vla_observation(seed: int) -> Observation:
    from tests.test_rtc import ENV, IMAGE

    rng = np.random.default_rng(seed)
    return Observation(
        images={"corner2": rng.integers(0, 256, size=(IMAGE, IMAGE, 3), dtype=np.uint8)},
        state=rng.normal(size=7).astype(np.float32),
        prompt=ENV.instruction,
    )


def test_rtc_field_inpaints_toward_the_unexecuted_actions(rtc_vla: Policy) -> None:
    """A request with ``rtc`` (the rest of the chunk being executed, delay d) gets a chunk whose first d
    actions repeat that rest, and whose action d (the first the robot executes) stays closer to the rest's
    than a plain request's does."""
    executed, delay = 4, 2
    prefix_errors, naive_errors, rtc_switch, naive_switch = [], [], [], []
    with start(rtc_vla) as background, OpenPIClientPolicy(background.url) as client:
        assert client.metadata["rtc"] is True
        for seed in range(6):
            previous = client.infer_one(_vla_observation(2 * seed))["actions"]
            rest = previous[executed:]
            observation = _vla_observation(2 * seed + 1)
            plain = client.infer_one(observation)
            reply = client.infer_one(observation, RTCRequest(rest, delay))
            assert reply["rtc"] is True and "rtc" not in plain
            inpainted, naive = reply["actions"], plain["actions"]
            prefix_errors.append(np.abs(inpainted[:delay] - rest[:delay]).max())
            naive_errors.append(np.abs(naive[:delay] - rest[:delay]).max())
            rtc_switch.append(np.abs(inpainted[delay] - rest[delay]).max())
            naive_switch.append(np.abs(naive[delay] - rest[delay]).max())
    span = float(np.ptp(previous))
    assert max(prefix_errors) < 0.05 * span, f"committed prefix drifted by {max(prefix_errors):.3f}"
    assert max(prefix_errors) < 0.2 * max(naive_errors)
    assert np.mean(rtc_switch) < 0.5 * np.mean(naive_switch), (rtc_switch, naive_switch)


def test_rtc_and_plain_requests_share_a_batch(rtc_vla: Policy) -> None:
    """An RTC request and a plain one are answered from one batched inference; only the former is inpainted."""
    rest = rtc_vla.infer(stack_observations([_vla_observation(0)])).actions[0, 3:]
    replies: dict[str, dict] = {}
    with start(rtc_vla, max_wait_ms=2000.0) as background:
        clients = {name: OpenPIClientPolicy(background.url) for name in ("rtc", "plain")}
        requests = {"rtc": RTCRequest(rest, 3), "plain": None}

        def run(name: str) -> None:
            replies[name] = clients[name].infer_one(_vla_observation(1), requests[name])

        threads = [threading.Thread(target=run, args=(name,)) for name in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert background.server.stats()["largest_batch"] == 2
    assert replies["rtc"]["rtc"] is True and "rtc" not in replies["plain"]
    assert replies["rtc"]["server_timing"]["batch_size"] == 2
    committed = np.abs(replies["rtc"]["actions"][:3] - rest[:3]).max()
    assert committed < np.abs(replies["plain"]["actions"][:3] - rest[:3]).max()


def test_rtc_field_is_ignored_by_a_policy_that_cannot_inpaint(policy: LinearPolicy, served) -> None:
    observation = make_observation(3)
    from policies.rtc import supports_inpainting

    with OpenPIClientPolicy(served.url) as client:
        assert client.metadata["rtc"] is False and not supports_inpainting(client)
        reply = client.infer_one(observation, RTCRequest(np.ones((2, ACTION_DIM), np.float32), 1))
    assert reply["rtc"] is False
    np.testing.assert_allclose(reply["actions"], expected_actions(policy, observation), rtol=1e-6)


@pytest.mark.parametrize(
    ("rtc", "fragment"),
    [
        ([1, 2], "rtc: expected a map with prev_chunk and delay, got list"),
        ({"delay": 1}, "rtc.prev_chunk: expected a K×4 float array, got NoneType"),
        ({"prev_chunk": np.zeros((3, 5), np.float32), "delay": 1}, "rtc.prev_chunk: shape (3, 5)"),
        ({"prev_chunk": np.zeros((11, 4), np.float32), "delay": 1}, "with 1 ≤ K ≤ 10"),
        ({"prev_chunk": np.zeros((3, 4), np.float32)}, "rtc.delay: expected an int ≥ 0, got None"),
        ({"prev_chunk": np.zeros((3, 4), np.float32), "delay": 1, "execute_horizon": 0}, "1 ≤ s ≤ 10"),
        (
            {"prev_chunk": np.zeros((3, 4), np.float32), "weights": np.ones(2)},
            "rtc.weights: expected 3 floats",
        ),
        ({"prev_chunk": np.zeros((3, 4), np.float32), "weights": np.full(3, 2.0)}, "in [0, 1]"),
    ],
)
def test_malformed_rtc_field_gets_a_one_line_error(rtc_vla: Policy, rtc, fragment) -> None:
    with start(rtc_vla) as background:
        connection, _ = raw_connect(background.url)
        message = observation_to_wire(_vla_observation(0))
        connection.send(msgpack_numpy.packb({**message, "rtc": rtc}))
        text = _assert_error_then_close(connection, "ObservationError", fragment)
        assert "\n" not in text
        with OpenPIClientPolicy(background.url) as client:
            assert client.infer_one(_vla_observation(1))["actions"].shape == (10, 4)


def test_rollouts_in_rtc_mode_inpaint_through_the_openpi_client(rtc_vla: Policy) -> None:
    """A rollout worker in RTC mode with the client as its policy: the targets travel in the ``rtc`` field
    (explicit weights), so each chunk's committed prefix continues the chunk that was executing."""
    from actors.execution import ExecutionConfig
    from policies.rtc import supports_inpainting
    from tests.test_rtc import _collect

    delay, steps = 2, 4
    with start(rtc_vla) as background, OpenPIClientPolicy(background.url) as client:
        assert supports_inpainting(client)
        records = _collect(
            client, ExecutionConfig(mode="rtc", delay=delay, execute_horizon=steps), episodes=1
        )
    assert len(records) == 1 and records[0].metadata["execution_mode"] == "rtc"
    chunks = records[0].chunks
    assert len(chunks) > 3
    for k in range(2, len(chunks)):
        committed = chunks[k - 1, steps : steps + delay]
        assert np.abs(chunks[k, :delay] - committed).max() < 0.05 * np.ptp(chunks)
