from ussycode.services.shares import new_link_token


def test_link_tokens_never_read_as_options() -> None:
    tokens = {new_link_token() for _ in range(2000)}
    assert len(tokens) == 2000
    assert all(t[0].isalnum() and len(t) == 32 for t in tokens)
