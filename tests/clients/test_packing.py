"""Packing of the batch client's messages: sizes as protobuf counts them, limits learnt."""

from __future__ import annotations

import grpc
import pytest

from visionserve.clients._errors import MessageTooLarge
from visionserve.clients._packing import Packing, message_size
from visionserve.protos import visionserve_pb2 as pb


def _request(image_bytes: int, key: str = "k") -> pb.SegmentRequest:
    request = pb.SegmentRequest(model="m", request_id=key, mask_format=pb.MASK_FORMAT_RAW)
    request.image.encoded = b"x" * image_bytes
    return request


@pytest.mark.parametrize("sizes", [[0], [100], [120, 16_000], [300_000] * 3, [2**21, 5]])
def test_message_sizes_add_up_to_the_serialized_message(sizes: list[int]) -> None:
    requests = [_request(n, f"key{i}") for i, n in enumerate(sizes)]
    batch = pb.SegmentBatch(requests=requests)
    assert sum(message_size(r, True) for r in requests) == len(batch.SerializeToString())
    assert message_size(requests[0], False) == len(requests[0].SerializeToString())


def test_a_limit_learnt_caps_messages_and_refuses_requests_over_it_alone() -> None:
    packing = Packing(per_message=8)
    small, big = _request(400_000), _request(1_500_000)
    assert packing.fits(10**9, small) and packing.over(big, True) is None  # nothing known
    limit = MessageTooLarge(request=True, server=True, size=2_000_000, limit=2**20)
    assert packing.learn(limit, None, "refused")
    assert packing.fits(message_size(small, True), small)
    assert not packing.fits(2 * message_size(small, True), small)
    error = packing.over(big, True)
    assert error is not None and error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "over the server's message limit of 1.00 MiB (1048576 bytes)" in error.details
    assert packing.over(small, False) is None
    assert not packing.learn(limit, packing.limit, "again")  # already heeded: misjudged


def test_answers_too_large_pack_fewer_down_to_one() -> None:
    packing = Packing(per_message=8)
    packing.fewer(8, MessageTooLarge(request=False, server=True, size=4 * 2**20, limit=2**20), "")
    assert packing.per_message == 2
    packing.fewer(8, MessageTooLarge(request=False, server=True, size=3 * 2**20, limit=2**20), "")
    assert packing.per_message == 2  # an older message's answer: no more than it had
    packing.fewer(2, MessageTooLarge(request=False, server=True, size=3 * 2**20, limit=2**20), "")
    assert packing.per_message == 1
