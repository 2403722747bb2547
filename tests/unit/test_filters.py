"""ketch.filters: containerd's filter syntax, its matching rules and its error texts."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from ketch import errdefs, filters

# A small corpus of objects, each seen through adaptor_for.
CORPUS: dict[str, dict[str, object]] = {
    "web": {"name": "web", "labels": {"app": "web", "tier": "front"}},
    "db": {"name": "db", "labels": {"app": "db", "com.example.backup": "nightly"}},
    "cache": {"name": "cache", "other": "too complex, yo"},
    "job": {"name": "job", "other": "abc", "labels": {"odd key \\ and \"": "yes"}},
    "batch": {"name": "batch", "labels": {"ver": "omg_asdf.asdf-qwer", "odd key \\ and \".post": "yes"}},
    "nameless": {"labels": {"app": "web"}},
}


def selected(strings: Sequence[str] | str) -> list[str]:
    f = filters.parse(strings)
    return [key for key, obj in CORPUS.items() if f.match(filters.adaptor_for(obj))]


ALL = list(CORPUS)


@pytest.mark.parametrize(
    ("strings", "expected"),
    [
        ([], ALL),
        ([""], ALL),
        ("", ALL),
        (["name"], ["web", "db", "cache", "job", "batch"]),
        (["labels.app"], ["web", "db", "nameless"]),
        (["labels.app,name"], ["web", "db"]),
        (["labels.app==web"], ["web", "nameless"]),
        (["name==web"], ["web"]),
        (["name!=web"], ["db", "cache", "job", "batch", "nameless"]),
        # != with an absent field compares against ""
        (["other!=abc"], ["web", "db", "cache", "batch", "nameless"]),
        (["name==web,labels.tier==front"], ["web"]),
        (["name==web,labels.tier==back"], []),
        # a list is OR
        (["name==web", "name==db"], ["web", "db"]),
        (["name==web", "name==nope"], ["web"]),
        # dotted label keys: the rest of the path is joined back with "."
        (["labels.com.example.backup==nightly"], ["db"]),
        (['labels."com.example.backup"==nightly'], ["db"]),
        (['labels."com.example.backup"'], ["db"]),
        (["labels.ver==omg_asdf.asdf-qwer"], ["batch"]),
        (['other=="too complex, yo"'], ["cache"]),
        (["other~=[abc]+,name!=job"], ["cache"]),
        (["other~=/[abc]+/,name!=job"], ["cache"]),
        (["other~=/[abc]{1,2}/"], ["cache", "job"]),
        (["other~=|^too|"], ["cache"]),
        # a regex searches; an absent field reads as ""
        (["other~=/.*/"], ALL),
        (["name~=^ba"], ["batch"]),
        (["other~=/[abc]{0,1}\"\\//"], []),
        ([r'labels."odd key \\ and \""==yes'], ["job"]),
        ([r'labels."odd key \\ and \"".post==yes'], ["batch"]),
        ([r'labels."\x61pp"==web'], ["web", "nameless"]),
        ([r'labels."\u0061pp"==web'], ["web", "nameless"]),
        ([r'labels."\141pp"==web'], ["web", "nameless"]),
        # whitespace before fields, operators and values is skipped
        (["name == web"], ["web"]),
        (["name==web, labels.tier"], ["web"]),
        (["  name==web"], ["web"]),
        (["unknown"], []),
        (["unknown!=x"], ALL),
        # an expression that does not compile matches nothing (containerd logs it)
        (["name~=[unclosed"], []),
        (["labels"], []),
    ],
)
def test_matching(strings: Sequence[str] | str, expected: list[str]) -> None:
    assert selected(strings) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "labels.|app|==web",
            "filters: parse error: [labels. >|||< app|==web]: invalid quote encountered",
        ),
        ("name==|web|", "filters: parse error: [name== >|||< web|]: invalid quote encountered"),
        (
            'labels.?"x"==present',
            'filters: parse error: [labels. >|?|< "x"==present]: expected field or quoted',
        ),
        ("name==web,", "filters: parse error: [name==web,]: expected field or quoted"),
        ("labels.", "filters: parse error: [labels.]: expected field or quoted"),
        (",name", "filters: parse error: [ >|,|< name]: expected field or quoted"),
        (
            "image~=,id?=?fbaq",
            "filters: parse error: [image~= >|,|< id?=?fbaq]: expected value or quoted",
        ),
        ("name==", "filters: parse error: [name==]: expected value or quoted"),
        (
            "labels.ns/key==value",
            "filters: parse error: [labels.ns >|/|< key==value]: quoted literal not terminated",
        ),
        (
            "labels.key==/value",
            "filters: parse error: [labels.key== >|/|< value]: quoted literal not terminated",
        ),
        (
            'labels."a\nb"==value',
            'filters: parse error: [labels. >|"|< a\nb"==value]: quoted literal not terminated',
        ),
        ('labels."\\g"', 'filters: parse error: [labels. >|"|< \\g"]: illegal escape sequence'),
        ('labels."\\xaz"', 'filters: parse error: [labels. >|"|< \\xaz"]: illegal numeric escape sequence'),
        ("foo\x00bar", "filters: parse error: [foo >|\x00|< bar]: unexpected null"),
        ("name===web", 'filters: parse error: [name >|=|< ==web]: unsupported operator "==="'),
        ("name=web", 'filters: parse error: [name >|=|< web]: unsupported operator "="'),
        ("name@web", "filters: parse error: [name >|@|< web]: expected an operator (\"==\"|\"!=\"|\"~=\")"),
        ("name==web other", "filters: parse error: [name==web >| |< other]: unexpected input:  "),
        # the space ends the field path, so an operator is expected where the comma stands
        ("name ,other", 'filters: parse error: [name  >|,|< other]: expected an operator ("=="|"!="|"~=")'),
        # a value cannot start with "." (the scanner reads it as a separator): quote it
        ("other~=.*", "filters: parse error: [other~= >|.|< *]: expected value or quoted"),
        # "|" ends a |quoted| value, so alternation needs /.../ quoting
        (
            "topic~=|^/tasks/(exit|delete)$|",
            "filters: parse error: [topic~=|^/tasks/(exit| >|d|< elete)$|]: unexpected input: d",
        ),
        # the scanner accepts \/ only inside /.../; unquoting refuses \' in a "..." string
        ('labels."\\/"', 'filters: parse error: [labels. >|"|< \\/"]: illegal escape sequence'),
        ('labels."\\U00110000"', 'filters: parse error: [labels. >|"|< \\U00110000"]: unquoting failed: quote syntax error'),
    ],
)
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(errdefs.InvalidArgument) as info:
        filters.parse([text])
    assert info.value.message == message
    assert str(info.value) == message + ": invalid argument"


def test_one_bad_string_fails_the_whole_list() -> None:
    with pytest.raises(errdefs.InvalidArgument):
        filters.parse(["name==web", "name=="])


def envelope(namespace: str, topic: str, **event: object) -> filters.Adaptor:
    return filters.adaptor_for({"namespace": namespace, "topic": topic, "event": event})


def test_dockerds_subscription_filter() -> None:
    f = filters.parse(["namespace==moby,topic~=|^/tasks/|"])
    assert f.match(envelope("moby", "/tasks/exit"))
    assert f.match(envelope("moby", "/tasks/exec-started"))
    assert not f.match(envelope("moby", "/containers/create"))
    assert not f.match(envelope("default", "/tasks/exit"))
    assert not f.match(envelope("moby", "/images/tasks/x"))


def test_ctrs_label_filter() -> None:
    f = filters.parse(['labels."foo"==bar'])
    assert f.match(filters.adaptor_for({"labels": {"foo": "bar"}}))
    assert not f.match(filters.adaptor_for({"labels": {"foo": "baz"}}))
    assert not f.match(filters.adaptor_for({"labels": {}}))


def test_regex_alternate_quotes_keep_slashes() -> None:
    f = filters.parse([r"topic~=/^\/tasks\/(exit|delete)$/"])
    assert f.match(envelope("x", "/tasks/exit"))
    assert not f.match(envelope("x", "/tasks/start"))
    f = filters.parse([r"topic~=/^\/containers\//"])
    assert f.match(envelope("x", "/containers/create"))


def test_unicode_values() -> None:
    f = filters.parse(["name~=牛,labels.moo==true"])
    assert f.match(filters.adaptor_for({"name": "a牛", "labels": {"moo": "true"}}))
    f = filters.parse(["name~=|牛|"])
    assert f.match(filters.adaptor_for({"name": "牛"}))


def test_adaptor_for_nested_and_lazy() -> None:
    calls = []

    def decode() -> dict[str, object]:
        calls.append(1)
        return {"container_id": "web", "pid": 42, "labels": {"a.b": "c"}}

    adaptor = filters.adaptor_for({"id": "x", "runtime": {"name": "io.containerd.runc.v2"}, "event": decode})
    assert adaptor(["runtime", "name"]) == ("io.containerd.runc.v2", True)
    assert adaptor(["runtime"]) == ("", False)
    assert adaptor(["id"]) == ("x", True)
    assert adaptor([]) == ("", False)
    assert calls == []
    assert adaptor(["event", "container_id"]) == ("web", True)
    assert adaptor(["event", "labels", "a", "b"]) == ("c", True)
    # only strings are exposed, as with containerd's generated Field methods
    assert adaptor(["event", "pid"]) == ("", False)
    assert adaptor(["event", "missing"]) == ("", False)
    assert calls == [1]
    assert filters.adaptor_for({"image": ""})(["image"]) == ("", False)


def test_lookup_map() -> None:
    assert filters.lookup_map(["a", "b"], {"a.b": "x"}) == ("x", True)
    assert filters.lookup_map(["a"], {}) == ("", False)
    assert filters.lookup_map(["a"], None) == ("", False)
