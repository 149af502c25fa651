"""A stand-in Gerrit that speaks Gerrit's ssh interface, built from its
documentation (cmd-stream-events, cmd-query, cmd-review, json), so the real
connection code runs against it: a paramiko server on 127.0.0.1 with key
authentication that answers

- `gerrit stream-events`: JSON lines the test injects (`emit`, `send_raw`),
  until the test drops the connection (`drop_streams`);
- `gerrit query --format JSON ...`: changes matching `change:`, `status:`
  and `project:` terms, then the stats line Gerrit ends with (`page_size`
  makes it page with `--start`);
- `gerrit review ...`: recorded in `reviews`; labels become approvals, the
  message a comment, `--submit` merges the patchset into its branch;
- `git-upload-pack '<project>'`: git over ssh from a real bare repository per
  project, in which each patchset is at refs/changes/NN/N/PS;

and, after `serve_rest()`, REST `POST /a/changes/<project>~<n>/revisions/<ps>/
review` and `.../submit` with basic auth, recorded as the ssh reviews are.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import socket
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import paramiko

from tests.harness import run_git

# What a write to a client that went away raises.
GONE = (OSError, EOFError, paramiko.SSHException)

USER = {"name": "Zuul", "email": "zuul@example.com", "username": "zuul"}
DEV = {"name": "Dev", "email": "dev@example.com", "username": "dev"}
MAINTAINER = {"name": "Maintainer", "email": "maint@example.com", "username": "maint"}


@dataclass
class FakeChange:
    number: int
    project: str
    branch: str
    subject: str
    message: str
    change_id: str
    status: str = "NEW"
    patchsets: list[dict] = field(default_factory=list)
    comments: list[dict] = field(default_factory=list)

    def attrs(self) -> dict:
        """Gerrit's change attribute."""
        return {
            "project": self.project,
            "branch": self.branch,
            "id": self.change_id,
            "number": self.number,
            "subject": self.subject,
            "owner": DEV,
            "url": f"http://gerrit.example.com/{self.number}",
            "createdOn": 1767225600,
            "lastUpdated": int(time.time()),
            "open": self.status == "NEW",
            "status": self.status,
        }

    def patchset(self, number: int | None = None) -> dict:
        return self.patchsets[(number or len(self.patchsets)) - 1]


def _ps_attrs(ps: dict, approvals: bool) -> dict:
    data = {k: val for k, val in ps.items() if k != "approvals"}
    if approvals and ps["approvals"]:
        data["approvals"] = ps["approvals"]
    return data


class _Server(paramiko.ServerInterface):
    def __init__(self, fake: FakeGerrit, transport: paramiko.Transport) -> None:
        self.fake = fake
        self.transport = transport

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        if username == USER["username"] and key.get_base64() == self.fake.client_key_b64:
            return paramiko.AUTH_SUCCESSFUL
        return paramiko.AUTH_FAILED

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        threading.Thread(
            target=self.fake._exec,
            args=(channel, command.decode(), self.transport),
            daemon=True,
        ).start()
        return True


class FakeGerrit:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.git_root = root / "git"
        self.git_root.mkdir(parents=True)
        self.client_key = root / "id_ed25519"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.client_key)],
            check=True,
        )
        self.client_key_b64 = paramiko.Ed25519Key(filename=str(self.client_key)).get_base64()
        self.host_key = paramiko.ECDSAKey.generate()
        self.changes: dict[int, FakeChange] = {}
        self.reviews: list[dict] = []
        self.commands: list[str] = []
        self.page_size = 500
        # Gerrit commands ("review", "query") whose next run takes effect but
        # whose answer is lost with the connection.
        self.lose_answer: list[str] = []
        self.refuse_streams = ""  # what `gerrit stream-events` fails with, if it does
        self.cond = threading.Condition()
        self._streams: list[tuple[paramiko.Channel, paramiko.Transport]] = []
        self._transports: list[paramiko.Transport] = []
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        self.known_hosts = root / "known_hosts"
        self.known_hosts.write_text(
            f"[127.0.0.1]:{self.port} {self.host_key.get_name()} {self.host_key.get_base64()}\n"
        )
        self._http: ThreadingHTTPServer | None = None
        self._running = True
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def connection_config(self, **extra) -> dict:
        """The zuul.yaml entry of a connection to this Gerrit."""
        return {
            "driver": "gerrit",
            "server": "127.0.0.1",
            "port": self.port,
            "user": USER["username"],
            "sshkey": str(self.client_key),
            "known-hosts": str(self.known_hosts),
            "event-delay": 0,
            **extra,
        }

    def serve_rest(self, password: str = "secret") -> str:
        """Answer Gerrit's REST review and submit calls too; returns the base URL."""
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                expected = base64.b64encode(f"{USER['username']}:{password}".encode()).decode()
                if self.headers.get("Authorization") != f"Basic {expected}":
                    return self._answer(401, "Unauthorized")
                match = re.fullmatch(
                    r"/a/changes/([^/~]+)~(\d+)/revisions/(\d+)/(review|submit)", self.path
                )
                if match is None:
                    return self._answer(404, "Not found")
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                review = {
                    "labels": dict(body.get("labels", {})),
                    "message": body.get("message", ""),
                    "submit": match.group(4) == "submit",
                    "project": urllib.parse.unquote(match.group(1)),
                    "rest": True,
                }
                error = fake._apply_review(int(match.group(2)), int(match.group(3)), review)
                if error:
                    return self._answer(409, error)
                return self._answer(200, ")]}'\n" + json.dumps({"status": "ok"}))

            def _answer(self, code: int, text: str) -> None:
                data = text.encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._http.server_address[1]}"

    def stop(self) -> None:
        """Stop listening for good: shutdown() wakes the accept() under way,
        which would otherwise go on accepting on a socket number the next
        listener may get."""
        self._running = False
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._acceptor.join(10)
        self._sock.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        for transport in list(self._transports):
            transport.close()

    # The ssh server -------------------------------------------------------

    def _accept(self) -> None:
        while self._running:
            try:
                sock, _ = self._sock.accept()
            except OSError:
                return
            transport = paramiko.Transport(sock)
            transport.add_server_key(self.host_key)
            self._transports.append(transport)
            try:
                transport.start_server(server=_Server(self, transport))
            except GONE:
                transport.close()

    def _exec(self, channel: paramiko.Channel, command: str, transport) -> None:
        with self.cond:
            self.commands.append(command)
            self.cond.notify_all()
        try:
            words = shlex.split(command)
            if words[:2] == ["gerrit", "stream-events"] and not self.refuse_streams:
                self._stream(channel, transport)
                return
            if words and words[0] == "git-upload-pack":
                self._upload_pack(channel, words[1])
                return
            if words[:2] == ["gerrit", "stream-events"]:
                out, err, status = "", self.refuse_streams + "\n", 1
            elif words[:2] == ["gerrit", "query"]:
                out, err, status = self._query(words[2:]), "", 0
            elif words[:2] == ["gerrit", "review"]:
                out, err, status = self._review(words[2:])
            else:
                out, err, status = "", f"fatal: {words[0]}: not found\n", 1
            with self.cond:
                lost = words[1:2] and words[1] in self.lose_answer
                if lost:
                    self.lose_answer.remove(words[1])
            if lost:  # done, but the connection breaks before the answer
                transport.close()
                return
            channel.sendall(out.encode())
            channel.sendall_stderr(err.encode())
            channel.send_exit_status(status)
            self._await_close(channel)
        except GONE:
            pass  # the client went away
        finally:
            try:
                channel.close()
            except GONE:
                pass

    @staticmethod
    def _await_close(channel: paramiko.Channel) -> None:
        """Send EOF and let the client close first: a close of ours could
        overtake paramiko's reply to the exec request, which the client would
        take for a refusal."""
        channel.shutdown_write()
        channel.settimeout(10)
        try:
            while channel.recv(1024):
                pass
        except TimeoutError:
            pass

    def _stream(self, channel: paramiko.Channel, transport) -> None:
        with self.cond:
            self._streams.append((channel, transport))
            self.cond.notify_all()
        try:
            while channel.recv(1024):
                pass
        finally:
            with self.cond:
                if (channel, transport) in self._streams:
                    self._streams.remove((channel, transport))
                self.cond.notify_all()

    def _upload_pack(self, channel: paramiko.Channel, path: str) -> None:
        repo = self.repo(path.strip("/").removesuffix(".git"))
        proc = subprocess.Popen(
            ["git-upload-pack", str(repo)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

        def pump_in() -> None:
            try:
                while data := channel.recv(65536):
                    proc.stdin.write(data)
                    proc.stdin.flush()
            except GONE:
                pass
            finally:
                try:
                    proc.stdin.close()
                except OSError:
                    pass

        def pump_err() -> None:
            try:
                while data := proc.stderr.read1(65536):
                    channel.sendall_stderr(data)
            except GONE:
                pass

        threads = [threading.Thread(target=f, daemon=True) for f in (pump_in, pump_err)]
        for thread in threads:
            thread.start()
        try:
            while data := proc.stdout.read1(65536):
                channel.sendall(data)
            threads[1].join()
            channel.send_exit_status(proc.wait())
            channel.shutdown_write()
            threads[0].join(10)
        finally:
            proc.kill()
            proc.wait()

    # Test controls --------------------------------------------------------

    def wait_for(self, predicate, timeout: float = 30, what: str = "the condition") -> None:
        with self.cond:
            if not self.cond.wait_for(predicate, timeout):
                raise AssertionError(f"fake Gerrit: timed out waiting for {what}")

    def wait_for_streams(self, count: int = 1, timeout: float = 30) -> None:
        self.wait_for(lambda: len(self._streams) >= count, timeout, f"{count} event stream(s)")

    def send_raw(self, line: str) -> None:
        with self.cond:
            for channel, _ in self._streams:
                try:
                    channel.sendall((line + "\n").encode())
                except GONE:
                    pass  # a stream closing: its client resyncs

    def emit(self, event: dict) -> None:
        self.send_raw(json.dumps({**event, "eventCreatedOn": int(time.time())}))

    def drop_streams(self) -> None:
        """Cut every event stream's connection, as a restarted Gerrit would."""
        with self.cond:
            streams = list(self._streams)
        for _, transport in streams:
            transport.close()
        self.wait_for(lambda: not any(s in self._streams for s in streams), what="the drop")

    def repo(self, project: str) -> Path:
        return self.git_root / f"{project}.git"

    def add_project(self, project: str, source: Path) -> None:
        run_git(self.git_root, "clone", "-q", "--bare", str(source), str(self.repo(project)))

    def branch_head(self, project: str, branch: str = "master") -> str:
        return run_git(self.repo(project), "rev-parse", f"refs/heads/{branch}").strip()

    def upload(
        self,
        project: str,
        source: Path,
        sha: str,
        branch: str = "master",
        number: int | None = None,
        emit: bool = True,
    ) -> tuple[int, int]:
        """Push commit `sha` of `source` as a new change (or a new patchset of
        `number`); announce it on the stream unless `emit` is False."""
        message = run_git(source, "log", "-1", "--format=%B", sha)
        with self.cond:
            if number is None:
                number = max(self.changes, default=0) + 1
                self.changes[number] = FakeChange(
                    number=number,
                    project=project,
                    branch=branch,
                    subject=message.splitlines()[0],
                    message=message,
                    change_id=f"I{number:040x}",
                )
            change = self.changes[number]
            ps = len(change.patchsets) + 1
            ref = f"refs/changes/{number % 100:02d}/{number}/{ps}"
            run_git(source, "push", "-q", str(self.repo(project)), f"{sha}:{ref}")
            parents = run_git(source, "log", "-1", "--format=%P", sha).split()
            change.message, change.subject = message, message.splitlines()[0]
            change.patchsets.append(
                {
                    "number": ps,
                    "revision": sha,
                    "parents": parents,
                    "ref": ref,
                    "uploader": DEV,
                    "createdOn": int(time.time()),
                    "author": DEV,
                    "kind": "REWORK",
                    "approvals": [],
                }
            )
        if emit:
            self.emit(
                {
                    "type": "patchset-created",
                    "change": change.attrs(),
                    "patchSet": _ps_attrs(change.patchset(ps), False),
                    "uploader": DEV,
                }
            )
        return number, ps

    def _vote(self, change: FakeChange, ps: int, who: dict, label: str, value: int) -> dict:
        """Set `who`'s vote; the approval attribute of the event, with oldValue."""
        approvals = change.patchset(ps)["approvals"]
        old = next(
            (
                a
                for a in approvals
                if a["type"] == label and a["by"]["username"] == who["username"]
            ),
            None,
        )
        if old is not None:
            approvals.remove(old)
        approvals.append(
            {
                "type": label,
                "description": label,
                "value": str(value),
                "grantedOn": int(time.time()),
                "by": who,
            }
        )
        return {
            "type": label,
            "description": label,
            "value": str(value),
            "oldValue": old["value"] if old else "0",
        }

    def _comment(self, change: FakeChange, ps: int, who: dict, text: str, votes: dict) -> str:
        head = f"Patch Set {ps}:" + "".join(f" {k}{v:+d}" for k, v in votes.items())
        message = f"{head}\n\n{text}" if text else head
        change.comments.append(
            {"timestamp": int(time.time()), "reviewer": who, "message": message}
        )
        return message

    def approve(self, number: int) -> None:
        """A maintainer's Code-Review+2 and Workflow+1 on the current patchset."""
        with self.cond:
            change = self.changes[number]
            ps = len(change.patchsets)
            votes = {"Code-Review": 2, "Workflow": 1}
            approvals = [self._vote(change, ps, MAINTAINER, k, v) for k, v in votes.items()]
            comment = self._comment(change, ps, MAINTAINER, "", votes)
        self.emit(
            {
                "type": "comment-added",
                "change": change.attrs(),
                "patchSet": _ps_attrs(change.patchset(ps), False),
                "author": MAINTAINER,
                "approvals": approvals,
                "comment": comment,
            }
        )

    def comment(self, number: int, text: str) -> None:
        with self.cond:
            change = self.changes[number]
            ps = len(change.patchsets)
            comment = self._comment(change, ps, DEV, text, {})
        self.emit(
            {
                "type": "comment-added",
                "change": change.attrs(),
                "patchSet": _ps_attrs(change.patchset(ps), False),
                "author": DEV,
                "approvals": [{"type": "Code-Review", "description": "Code-Review", "value": "0"}],
                "comment": comment,
            }
        )

    def reviews_of(self, number: int) -> list[dict]:
        with self.cond:
            return [r for r in self.reviews if r["change"] == number]

    # Commands -------------------------------------------------------------

    def _query(self, args: list[str]) -> str:
        options: set[str] = set()
        terms: list[str] = []
        start = 0
        words = iter(args)
        for word in words:
            if word in ("--format", "--start", "-S"):
                value = next(words)
                start = int(value) if word != "--format" else start
            elif word.startswith("--"):
                options.add(word)
            else:
                terms.extend(word.split())
        with self.cond:
            found = [c for _, c in sorted(self.changes.items()) if self._matches(c, terms)]
            page = found[start : start + self.page_size]
            lines = [json.dumps(self._row(c, options)) for c in page]
        stats = {
            "type": "stats",
            "rowCount": len(page),
            "runTimeMilliseconds": 3,
            "moreChanges": start + len(page) < len(found),
        }
        return "\n".join([*lines, json.dumps(stats)]) + "\n"

    @staticmethod
    def _matches(change: FakeChange, terms: list[str]) -> bool:
        for term in terms:
            key, _, value = term.partition(":")
            if key == "change" and value not in (str(change.number), change.change_id):
                return False
            if key == "status" and value == "open" and change.status != "NEW":
                return False
            if key == "status" and value != "open" and change.status != value.upper():
                return False
            if key == "project" and value != change.project:
                return False
        return True

    def _row(self, change: FakeChange, options: set[str]) -> dict:
        row = change.attrs()
        if "--dependencies" in options:
            row.update(self._dependencies(change))
        every = "--all-approvals" in options
        if "--commit-message" in options:
            row["commitMessage"] = change.message
        if "--current-patch-set" in options:
            row["currentPatchSet"] = _ps_attrs(change.patchset(), True)
        if every or "--patch-sets" in options:
            row["patchSets"] = [_ps_attrs(ps, every) for ps in change.patchsets]
        if "--comments" in options:
            row["comments"] = list(change.comments)
        return row

    def _dependencies(self, change: FakeChange) -> dict:
        """dependsOn: the changes of the current patchset's git parents;
        neededBy: the changes whose current patchset has one of this change's
        patchsets as its parent."""

        def ref(other: FakeChange, ps: dict) -> dict:
            return {
                "id": other.change_id,
                "number": other.number,
                "revision": ps["revision"],
                "ref": ps["ref"],
                "isCurrentPatchSet": ps is other.patchset(),
            }

        parents = set(change.patchset()["parents"])
        mine = {ps["revision"] for ps in change.patchsets}
        data: dict = {}
        for other in self.changes.values():
            for ps in other.patchsets:
                if ps["revision"] in parents:
                    data.setdefault("dependsOn", []).append(ref(other, ps))
            if mine & set(other.patchset()["parents"]):
                data.setdefault("neededBy", []).append(ref(other, other.patchset()))
        return data

    def _review(self, args: list[str]) -> tuple[str, str, int]:
        review: dict = {"labels": {}, "message": "", "submit": False, "project": None}
        words = iter(args)
        target = ""
        for word in words:
            if word in ("--project", "-p"):
                review["project"] = next(words)
            elif word in ("--message", "-m"):
                review["message"] = next(words)
            elif word in ("--label", "-l"):
                label, _, value = next(words).partition("=")
                review["labels"][label] = int(value)
            elif word in ("--submit", "-s"):
                review["submit"] = True
            elif word.startswith("-"):
                return "", f'fatal: "{word}" is not a valid option\n', 1
            else:
                target = word
        number, _, ps = target.partition(",")
        if not number.isdigit() or not ps.isdigit():
            return "", f'fatal: "{target}" no such change\n', 1
        error = self._apply_review(int(number), int(ps), review)
        return ("", f"{error}\n", 1) if error else ("", "", 0)

    def _apply_review(self, number: int, ps: int, review: dict) -> str | None:
        """Record a review (over ssh or REST); an error's text, or None."""
        with self.cond:
            change = self.changes.get(number)
            if change is None or ps > len(change.patchsets):
                return f'fatal: "{number},{ps}" no such change'
            if review["project"] not in (None, change.project):
                return f"fatal: change {number} is not in project {review['project']}"
            if review["submit"] and change.status != "NEW":
                return "error: change is closed"
            review.update(change=change.number, patchset=ps)
            self.reviews.append(review)
            approvals = [self._vote(change, ps, USER, k, v) for k, v in review["labels"].items()]
            events = []
            if review["message"] or approvals:
                comment = self._comment(change, ps, USER, review["message"], review["labels"])
                events.append(
                    {
                        "type": "comment-added",
                        "change": change.attrs(),
                        "patchSet": _ps_attrs(change.patchset(ps), False),
                        "author": USER,
                        "approvals": approvals,
                        "comment": comment,
                    }
                )
            if review["submit"]:
                events += self._submit(change, ps)
            self.cond.notify_all()
        for event in events:
            self.emit(event)
        return None

    def _submit(self, change: FakeChange, ps: int) -> list[dict]:
        """Merge the patchset into its branch (fast-forward, else a merge
        commit), as Gerrit's merge-if-necessary; the events Gerrit sends."""
        repo = self.repo(change.project)
        sha = change.patchset(ps)["revision"]
        old = self.branch_head(change.project, change.branch)
        new = sha
        if run_git(repo, "merge-base", old, sha).strip() != old:
            tree = run_git(repo, "merge-tree", "--write-tree", old, sha).split()[0]
            new = run_git(
                repo, "commit-tree", tree, "-p", old, "-p", sha, "-m", f"Merge {change.subject}"
            ).strip()
        run_git(repo, "update-ref", f"refs/heads/{change.branch}", new, old)
        change.status = "MERGED"
        return [
            {
                "type": "change-merged",
                "change": change.attrs(),
                "patchSet": _ps_attrs(change.patchset(ps), False),
                "submitter": USER,
                "newRev": new,
            },
            {
                "type": "ref-updated",
                "submitter": USER,
                "refUpdate": {
                    "oldRev": old,
                    "newRev": new,
                    "refName": f"refs/heads/{change.branch}",
                    "project": change.project,
                },
            },
        ]
