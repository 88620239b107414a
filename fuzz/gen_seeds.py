#!/usr/bin/env python3
"""Writes the seed corpora under fuzz/seeds/ from files in the repository and a
journal segment of a real agent run (argument 1). Run again to refresh them."""
import io, json, pathlib, struct, sys, zipfile

root = pathlib.Path(__file__).resolve().parent
repo = root.parent
corpus = root / "seeds"

def put(target, name, data):
    d = corpus / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())

def records(seg):
    off, out = 0, []
    while off + 8 <= len(seg):
        n = struct.unpack_from("<I", seg, off)[0]
        out.append(seg[off + 8: off + 8 + n])
        off += 8 + n
    return out

# Policy and rules: the shipped examples and the built-in rule pack.
put("policy_file", "example.toml", (repo / "config/policy.toml").read_text())
for f in sorted((repo / "collector/src/rules/builtin").glob("*.toml")):
    put("rules_file", f.name, f.read_text())
put("rules_file", "secs", "15m")

# Journal, batches, commands: records of a real run, re-addressed to the fuzz agent.
seg = pathlib.Path(sys.argv[1]).read_bytes()
recs = records(seg)[:40]
agent = json.loads(recs[0])["event_id"].split(":")[0]
recs = [r.replace(agent.encode(), b"fz-agent") for r in recs]
put("journal_segment", "run", b"".join(b"\x01" + r + b"\xff" for r in recs))
put("journal_segment", "torn", b"".join(b"\x01" + r + b"\xff" for r in recs[:3]) + b"\x00" + recs[3][:20])
for i in range(0, len(recs), 8):
    group = recs[i:i + 8]
    keys = [json.loads(r)["event_id"].split(":") for r in group]
    body = '{"agent_id":"fz-agent","batch_id":%d,"first":{"epoch":%s,"seq":%s},"last":{"epoch":%s,"seq":%s},"events":[%s],"head":{"epoch":%s,"seq":%s}}' % (
        i, keys[0][1], keys[0][2], keys[-1][1], keys[-1][2], ",".join(r.decode() for r in group), keys[-1][1], keys[-1][2])
    put("signed_batch", f"batch-{i}", b"\x01" + body.encode())
put("signed_batch", "envelope", b"\x00" + json.dumps({"v": 1, "purpose": "batch", "alg": "ecdsa-p256-sha256", "cert": "AAAA", "body": "{}", "sig": "AAAA"}).encode())
cmds = [
    {"agent_id": "fz-agent", "seq": 7, "expires_at": "2030-01-01T00:00:00Z", "action": {"kind": "request-inventory"}},
    {"agent_id": "fz-agent", "seq": 8, "expires_at": "2030-01-01T00:00:00Z", "action": {"kind": "block-device", "device_hash": "ab" * 32}},
]
for n, c in enumerate(cmds):
    put("agent_commands", f"command-{n}", b"\x01" + json.dumps(c).encode())
put("agent_commands", "ack", b"\x03" + json.dumps({"agent_id": "fz-agent", "batch_id": 1, "first": {"epoch": 1, "seq": 1}, "last": {"epoch": 1, "seq": 2}, "stored": 2, "duplicates": 0, "rejected": []}).encode())
put("agent_commands", "policy", b"\x05" + json.dumps({"version": "v1", "policy_toml": (repo / "config/policy.toml").read_text(), "serial": 3}).encode())
put("agent_commands", "unlock", b"\x07" + json.dumps({"id": "u1", "agent_id": "fz-agent", "device_hash": "ab" * 32, "mode": "allow", "not_before": "2020-01-01T00:00:00Z", "not_after": "2030-01-01T00:00:00Z"}).encode())
put("agent_commands", "presence", b"\x09" + json.dumps({"state": "online", "connection": 5, "time": "2026-12-05T10:00:00Z"}).encode())

# Login evidence.
lines = [
    ("sshd", "Accepted publickey for alice from 10.0.0.5 port 51234 ssh2: ED25519 SHA256:abc"),
    ("sshd", "Failed password for invalid user admin from 10.0.0.9 port 2222 ssh2"),
    ("sudo", "    bob : TTY=pts/0 ; PWD=/home/bob ; USER=root ; COMMAND=/usr/bin/id"),
    ("sshd", "pam_unix(sshd:session): session closed for user alice"),
    ("login", "pam_unix(login:session): session opened for user carol(uid=1001) by LOGIN(uid=0)"),
]
for n, (p, m) in enumerate(lines):
    put("access_lines", f"line-{n}", b"\x00" + f"{p}\n{m}".encode())
    put("access_lines", f"journal-{n}", b"\x01" + json.dumps({"SYSLOG_IDENTIFIER": p, "MESSAGE": m, "_PID": "812", "__CURSOR": "s=1;i=2"}).encode())
rec = bytearray(384)
struct.pack_into("<hi", rec, 0, 7, 4242)
rec[8:13] = b"pts/3"; rec[44:49] = b"alice"; rec[76:84] = b"10.0.0.5"
put("access_lines", "wtmp", b"\x02" + bytes(rec))

# Devices.
put("usb_descriptors", "stick", bytes([18, 1, 0, 2, 0, 0, 0, 64, 0x81, 0x07, 0x58, 0x55, 0, 1, 1, 2, 3, 1,
                                       9, 2, 32, 0, 1, 1, 0, 0x80, 50, 9, 4, 0, 0, 2, 8, 6, 80, 0,
                                       7, 5, 0x81, 2, 0, 2, 0, 7, 5, 2, 2, 0, 2, 0]))
fat = bytearray(2048); fat[0:3] = b"\xeb\x3c\x90"; fat[39:43] = b"\x12\x34\x56\x78"; fat[43:54] = b"WEILAN     "; fat[54:62] = b"FAT16   "; fat[510:512] = b"\x55\xaa"
put("fs_superblock", "fat16", bytes(fat))
ext = bytearray(2048); ext[1024 + 56:1024 + 58] = b"\x53\xef"; ext[1024 + 104:1024 + 120] = bytes(range(16)); ext[1024 + 120:1024 + 126] = b"stick1"
put("fs_superblock", "ext4", bytes(ext))
ue = b"add@/devices/pci0000:00/0000:00:14.0/usb1/1-1\0ACTION=add\0DEVPATH=/devices/pci0000:00/0000:00:14.0/usb1/1-1\0SUBSYSTEM=usb\0DEVTYPE=usb_device\0PRODUCT=781/5581/100\0SEQNUM=4711\0"
put("uevent", "add", ue)
put("uevent", "block", ue.replace(b"SUBSYSTEM=usb", b"SUBSYSTEM=block").replace(b"usb_device", b"partition"))
put("mountinfo", "self", pathlib.Path("/proc/self/mountinfo").read_bytes())
put("mountinfo", "escaped", b"36 35 8:17 / /media/a\\040b rw,nosuid shared:1 - vfat /dev/sdb1 rw,uid=1000\n")
put("badge", "card", bytes(sum([[c, 0] for c in [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 28]], [])))

# Documents: what the classifier's unit tests build, plus plain text.
put("extract", "text", "机密★ 身份证 11010519491231002X 手机 13800138000\n".encode())
put("extract", "gb18030", "绝密★启用前 银行卡 6222021234567890128".encode("gb18030"))


def office(parts):
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w", zipfile.ZIP_DEFLATED) as z:
        for n, t in parts:
            z.writestr(n, t)
    return b.getvalue()
put("extract", "docx", office([("[Content_Types].xml", "<Types/>"), ("word/document.xml",
    '<w:document xmlns:w="w"><w:body><w:p><w:r><w:t>机密</w:t></w:r><w:r><w:t>★一年</w:t></w:r></w:p>'
    '<w:p><w:r><w:t>11010519491231002X</w:t></w:r></w:p></w:body></w:document>')]))
put("extract", "xlsx", office([("xl/sharedStrings.xml", '<sst><si><t>手机</t></si><si><t>13800138000</t></si></sst>'),
    ("xl/worksheets/sheet1.xml", '<worksheet><sheetData><row><c t="s"><v>0</v></c><c><v>13900139000</v></c></row></sheetData></worksheet>')]))

