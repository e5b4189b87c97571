"""Realistic Caliper 1.2 events, for tests, benchmarks and trying LAP out.

Deterministic for a seed: many learners and courses, mixed event types
(navigation, views, assessments with attempts, grades with scores, media,
sessions, tool use, forum posts), unique ids, about 1 KB each.
"""

from __future__ import annotations

import random
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

V1P2 = "http://purl.imsglobal.org/ctx/caliper/v1p2"
BASE = "https://lms.example.edu"


def _iso(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def _duration(seconds: int) -> str:
    minutes, secs = divmod(seconds, 60)
    return f"PT{minutes}M{secs}S" if minutes else f"PT{secs}S"


class EventFactory:
    def __init__(self, seed: int = 0, learners: int = 1000, courses: int = 50,
                 start: datetime = datetime(2026, 9, 1, tzinfo=timezone.utc), days: int = 30):
        self.rng = random.Random(seed)
        self.learners = learners
        self.courses = courses
        self.start = start
        self.span_s = days * 86400

    def _id(self) -> str:
        return f"urn:uuid:{uuid.UUID(int=self.rng.getrandbits(128), version=4)}"

    def _context(self, learner: int, course: int) -> dict[str, Any]:
        section = f"{BASE}/terms/2026fall/courses/{course}/sections/1"
        return {
            "edApp": {"id": BASE, "type": "SoftwareApplication", "version": "4.2"},
            "group": {"id": section, "type": "CourseSection", "courseNumber": f"CPS {100 + course}-01",
                      "academicSession": "Fall 2026"},
            "membership": {"id": f"{section}/rosters/1", "type": "Membership",
                           "member": f"{BASE}/users/{learner}", "organization": section,
                           "roles": ["Learner"], "status": "Active"},
            "session": {"id": f"{BASE}/sessions/{self.rng.getrandbits(64):016x}", "type": "Session",
                        "startedAtTime": _iso(self.start)},
        }

    def event(self) -> dict[str, Any]:
        learner = self.rng.randrange(self.learners)
        course = self.rng.randrange(self.courses)
        when = self.start + timedelta(seconds=self.rng.randrange(self.span_s), milliseconds=self.rng.randrange(1000))
        person = {"id": f"{BASE}/users/{learner}", "type": "Person"}
        section = f"{BASE}/terms/2026fall/courses/{course}/sections/1"
        assessment = f"{section}/assess/{self.rng.randrange(1, 9)}"
        attempt = {"id": f"{assessment}/users/{learner}/attempts/1", "type": "Attempt",
                   "assignee": person["id"], "assignable": assessment, "count": 1,
                   "startedAtTime": _iso(when - timedelta(minutes=20)), "endedAtTime": _iso(when),
                   "duration": _duration(self.rng.randrange(60, 3600))}
        kind = self.rng.random()
        if kind < 0.30:
            body = {"type": "NavigationEvent", "profile": "ReadingProfile", "actor": person, "action": "NavigatedTo",
                    "object": {"id": f"{section}/pages/{self.rng.randrange(200)}", "type": "WebPage",
                               "name": "Course page"}}
        elif kind < 0.50:
            body = {"type": "ViewEvent", "profile": "ReadingProfile", "actor": person, "action": "Viewed",
                    "object": {"id": f"{section}/docs/{self.rng.randrange(80)}", "type": "Document",
                               "name": "Reading", "version": "1"}}
        elif kind < 0.60:
            body = {"type": "AssessmentEvent", "profile": "AssessmentProfile", "actor": person, "action": "Started",
                    "object": {"id": assessment, "type": "Assessment", "maxScore": 25.0},
                    "generated": {k: v for k, v in attempt.items() if k not in ("endedAtTime", "duration")}}
        elif kind < 0.70:
            body = {"type": "AssessmentEvent", "profile": "AssessmentProfile", "actor": person, "action": "Submitted",
                    "object": {"id": assessment, "type": "Assessment", "maxScore": 25.0}, "generated": attempt}
        elif kind < 0.78:
            given = round(self.rng.uniform(0, 25), 1)
            body = {"type": "GradeEvent", "profile": "GradingProfile",
                    "actor": {"id": f"{BASE}/autograder", "type": "SoftwareApplication", "version": "2"},
                    "action": "Graded", "object": attempt,
                    "generated": {"id": f"{attempt['id']}/scores/1", "type": "Score", "attempt": attempt["id"],
                                  "maxScore": 25.0, "scoreGiven": given, "scoredBy": f"{BASE}/autograder"}}
        elif kind < 0.86:
            body = {"type": "MediaEvent", "profile": "MediaProfile", "actor": person,
                    "action": self.rng.choice(["Started", "Paused", "Resumed", "Ended"]),
                    "object": {"id": f"{section}/videos/{self.rng.randrange(30)}", "type": "VideoObject",
                               "duration": _duration(self.rng.randrange(120, 2400))},
                    "target": {"id": f"{section}/videos/1#t=30", "type": "MediaLocation",
                               "currentTime": _duration(self.rng.randrange(1, 120))}}
        elif kind < 0.92:
            body = {"type": "SessionEvent", "profile": "SessionProfile", "actor": person,
                    "action": self.rng.choice(["LoggedIn", "LoggedOut"]),
                    "object": {"id": BASE, "type": "SoftwareApplication", "version": "4.2"}}
        elif kind < 0.97:
            body = {"type": "ToolUseEvent", "profile": "ToolUseProfile", "actor": person, "action": "Used",
                    "object": {"id": f"{BASE}/tools/{self.rng.randrange(5)}", "type": "SoftwareApplication"}}
        else:
            forum = f"{section}/forums/1"
            body = {"type": "MessageEvent", "profile": "ForumProfile", "actor": person, "action": "Posted",
                    "object": {"id": f"{forum}/topics/1/messages/{self.rng.getrandbits(32)}", "type": "Message",
                               "body": "A question about this week's reading.",
                               "isPartOf": {"id": f"{forum}/topics/1", "type": "Thread", "isPartOf": forum}}}
        event = {"@context": V1P2, "id": self._id(), **body, "eventTime": _iso(when)}
        event.update(self._context(learner, course))
        if body["type"] == "SessionEvent":
            event.pop("session")  # the session is the object's own business here
        return event

    def events(self, n: int) -> list[dict[str, Any]]:
        return [self.event() for _ in range(n)]


def envelope(items: list[dict[str, Any]], sensor: str = f"{BASE}/sensors/lms",
             data_version: str = V1P2, send_time: datetime | None = None) -> dict[str, Any]:
    return {"sensor": sensor, "sendTime": _iso(send_time or datetime.now(timezone.utc)),
            "dataVersion": data_version, "data": items}
