"""The SSRF guard, with resolvers injected so no test needs DNS."""

import re
from collections.abc import Sequence

import pytest

from core.urlguard import (
    GuardedUrl,
    HostNotFound,
    Resolver,
    UnsafeUrl,
    check_url,
    resolve_host,
)

PUBLIC = "93.184.215.14"


def resolver(answers: dict[str, list[str]]) -> Resolver:
    """A resolver that knows only the given names, as getaddrinfo would answer for them."""

    def resolve(host: str, port: int) -> Sequence[str]:
        if host not in answers:
            raise OSError(f"[Errno -2] Name or service not known: {host}")
        return answers[host]

    return resolve


LOCAL_NAMES = resolver({"localhost": ["::1", "127.0.0.1"]})


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1",
        "http://localhost",
        "http://[::1]",
        "http://[::ffff:127.0.0.1]",
        "http://0x7f000001",
        "http://2130706433",
        "http://0177.0.0.1",
        "http://127.1",
        "http://169.254.169.254",
        "http://[fd00::1]",
        "http://100.64.0.1",
        "http://[64:ff9b::a9fe:a9fe]",
        "http://[2002:7f00:1::]",
        "http://[::127.0.0.1]",
        "http://[64:ff9b:1::a9fe:a9fe]",
        "http://[2001:0:4136:e378:8000:63bf:80ff:fffe]",
        "http://[fe80::1]",
        "http://[fec0::1]",
        "http://[ff02::1]",
        "http://0.0.0.0",
        "http://10.1.2.3",
        "http://172.16.0.1",
        "http://192.168.1.1",
        "http://192.0.2.1",
        "http://198.18.0.1",
        "http://224.0.0.1",
        "http://240.0.0.1",
        "http://255.255.255.255",
        "file:///etc/passwd",
        "gopher://x",
        "ftp://example.com/",
    ],
)
def test_refused(url: str) -> None:
    with pytest.raises(UnsafeUrl) as caught:
        check_url(url, resolve=LOCAL_NAMES)
    # Refused for what the URL is, not because a name failed to resolve.
    assert not isinstance(caught.value, HostNotFound)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (
            "http://127.0.0.1/hook",
            "callback host resolves to 127.0.0.1, a loopback address;"
            " only public addresses are allowed",
        ),
        ("http://localhost/", "resolves to ::1, a loopback address"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254, a link-local address"),
        ("http://100.64.0.1/", "carrier-grade NAT"),
        ("http://[fd00::1]/", "fd00::1, a unique-local address"),
        ("http://[::ffff:127.0.0.1]/", "(which carries 127.0.0.1), a loopback address"),
        ("http://[64:ff9b::a9fe:a9fe]/", "(which carries 169.254.169.254), a link-local"),
        ("http://[2002:7f00:1::]/", "(which carries 127.0.0.1), a loopback address"),
        ("http://[64:ff9b:1::1]/", "a local-use NAT64 address"),
        (
            "http://0x7f000001/",
            "0x7f000001 is a non-standard spelling of the IPv4 address 127.0.0.1",
        ),
        ("http://2130706433/", "non-standard spelling of the IPv4 address 127.0.0.1"),
        ("file:///etc/passwd", "scheme is 'file'; only http and https are allowed"),
        ("gopher://x", "scheme is 'gopher'"),
        ("https://user:pw@example.com/", "must not contain a user name or password"),
        ("https://example.com@127.0.0.1/", "must not contain a user name or password"),
        ("https:///path", "has no host"),
        ("https://exa mple.com/", "whitespace or control characters"),
        ("https://example.com:99999/", "port is invalid"),
        ("https://example.com:0/", "port must be between 1 and 65535"),
        ("https://exa$mple.com/", "not a valid hostname"),
        ("https://[::1/", "malformed"),
        ("https://example.com/" + "a" * 2048, "the limit is 2048"),
    ],
)
def test_reason_says_what_is_wrong(url: str, reason: str) -> None:
    with pytest.raises(UnsafeUrl) as caught:
        check_url(url, resolve=resolver({"localhost": ["::1"], "example.com": [PUBLIC]}))
    assert reason in caught.value.reason
    assert caught.value.field == "webhook.url"


def test_public_address_accepted_with_everything_the_sender_needs() -> None:
    url = "https://Hooks.Example.com:8443/in/coming?x=1&y=%20#frag"
    got = check_url(url, resolve=resolver({"hooks.example.com": [PUBLIC, PUBLIC]}))
    assert got == GuardedUrl(
        url=url,
        scheme="https",
        host="hooks.example.com",
        port=8443,
        path_and_query="/in/coming?x=1&y=%20",
        addresses=(PUBLIC,),
    )


def test_default_ports_and_root_path() -> None:
    names = resolver({"example.com": [PUBLIC]})
    assert check_url("http://example.com", resolve=names).port == 80
    assert check_url("https://example.com", resolve=names).path_and_query == "/"
    assert check_url("https://example.com", resolve=names).port == 443


def test_public_literals_need_no_resolver() -> None:
    def no_dns(host: str, port: int) -> Sequence[str]:
        raise AssertionError("an IP literal must not be looked up")

    assert check_url(f"http://{PUBLIC}/", resolve=no_dns).addresses == (PUBLIC,)
    v6 = check_url("https://[2606:2800:220:1::1]/", resolve=no_dns)
    assert (v6.host, v6.addresses) == ("2606:2800:220:1::1", ("2606:2800:220:1::1",))


def test_transition_forms_of_public_addresses_are_accepted() -> None:
    # 6to4 and NAT64 of a public IPv4 address route to that public address.
    for host in ("[2002:5db8:d70e::]", "[64:ff9b::5db8:d70e]"):
        assert check_url(f"http://{host}/", resolve=LOCAL_NAMES).addresses


def test_one_private_answer_among_public_ones_is_refused() -> None:
    names = resolver({"rebind.example": [PUBLIC, "127.0.0.1"]})
    with pytest.raises(UnsafeUrl, match=re.escape("resolves to 127.0.0.1, a loopback")):
        check_url("https://rebind.example/", resolve=names)


def test_international_hostname_is_resolved_in_punycode() -> None:
    got = check_url(
        "https://münchen.example/ä", resolve=resolver({"xn--mnchen-3ya.example": [PUBLIC]})
    )
    assert (got.host, got.path_and_query) == ("xn--mnchen-3ya.example", "/%C3%A4")


def test_unresolvable_host_is_its_own_error() -> None:
    with pytest.raises(HostNotFound, match="could not be resolved"):
        check_url("https://nowhere.invalid/", resolve=LOCAL_NAMES)
    with pytest.raises(HostNotFound, match="resolves to no address"):
        check_url("https://empty.example/", resolve=resolver({"empty.example": []}))


def test_allow_private_lifts_only_the_address_check() -> None:
    got = check_url("http://localhost:8080/hook", allow_private=True, resolve=LOCAL_NAMES)
    assert got.addresses == ("::1", "127.0.0.1")
    assert check_url("http://127.0.0.1/", allow_private=True).addresses == ("127.0.0.1",)
    for url in ("file:///etc/passwd", "http://u:p@127.0.0.1/", "http://0x7f000001/"):
        with pytest.raises(UnsafeUrl):
            check_url(url, allow_private=True, resolve=LOCAL_NAMES)


def test_system_resolver_answers_for_localhost() -> None:
    # /etc/hosts answers this without a network.
    assert set(resolve_host("localhost", 80)) & {"127.0.0.1", "::1"}
