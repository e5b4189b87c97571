"""Controlled vocabularies of Caliper 1.1 and 1.2: context IRIs, actions, terms.

Only data lives here; :mod:`lap.caliper.registry` turns it into per-version type
tables and :mod:`lap.caliper.models` into pydantic models.
"""

from __future__ import annotations

CALIPER_V1P1 = "http://purl.imsglobal.org/ctx/caliper/v1p1"
CALIPER_V1P2 = "http://purl.imsglobal.org/ctx/caliper/v1p2"

# Caliper 1.1 extension contexts: each imports the 1.1 context and adds the terms
# of one profile that later became part of Caliper 1.2.
EXT_FEEDBACK = "FeedbackProfile-extension"
EXT_RESOURCE_MANAGEMENT = "ResourceManagementProfile-extension"
EXT_SEARCH = "SearchProfile-extension"
EXT_SURVEY = "SurveyProfile-extension"
EXT_TOOL_LAUNCH = "ToolLaunchProfile-extension"
EXT_TOOL_USE = "ToolUseProfile-extension"
V1P1_EXTENSIONS = (
    EXT_FEEDBACK,
    EXT_RESOURCE_MANAGEMENT,
    EXT_SEARCH,
    EXT_SURVEY,
    EXT_TOOL_LAUNCH,
    EXT_TOOL_USE,
)
EXTENSION_IRIS = {f"{CALIPER_V1P1}/{name}": name for name in V1P1_EXTENSIONS}

# --- actions -----------------------------------------------------------------

# Appendix A of Caliper 1.1 (the terms of the v1p1 context).
ACTIONS_V1P1 = frozenset(
    """
    Abandoned Activated Added Attached Bookmarked ChangedResolution ChangedSize
    ChangedSpeed ChangedVolume Classified ClosedPopout Commented Completed Created
    Deactivated Deleted Described DisabledClosedCaptioning Disliked
    EnabledClosedCaptioning Ended EnteredFullScreen ExitedFullScreen ForwardedTo
    Graded Hid Highlighted Identified JumpedTo Liked Linked LoggedIn LoggedOut
    MarkedAsRead MarkedAsUnread Modified Muted NavigatedTo OpenedPopout Paused
    Posted Questioned Ranked Recommended Removed Reset Restarted Resumed Retrieved
    Reviewed Rewound Searched Shared Showed Skipped Started Submitted Subscribed
    Tagged TimedOut Unmuted Unsubscribed Used Viewed
    """.split()
)
# The published JSON-LD contexts spell two media actions without the "d"; both
# spellings name the same action, so both are accepted.
CAPTIONING_ALIASES = frozenset({"DisabledCloseCaptioning", "EnabledCloseCaptioning"})

# Actions Caliper 1.2 adds to the vocabulary.
ACTIONS_NEW_IN_V1P2 = frozenset(
    """
    Accepted Archived Copied Declined Downloaded Launched OptedIn OptedOut
    Printed Published Restored Returned Saved Sent Unpublished Uploaded
    """.split()
)
ACTIONS_V1P2 = ACTIONS_V1P1 | ACTIONS_NEW_IN_V1P2

# Actions each 1.1 extension context adds.
EXTENSION_ACTIONS = {
    EXT_TOOL_LAUNCH: frozenset({"Launched", "Returned"}),
    EXT_SURVEY: frozenset({"Accepted", "Declined", "OptedIn", "OptedOut", "Sent"}),
    EXT_RESOURCE_MANAGEMENT: frozenset(
        {
            "Archived", "Copied", "Downloaded", "Printed", "Published",
            "Restored", "Saved", "Unpublished", "Uploaded",
        }
    ),
    EXT_FEEDBACK: frozenset(),
    EXT_SEARCH: frozenset(),
    EXT_TOOL_USE: frozenset(),
}

MEDIA_ACTIONS = (
    "Started", "Ended", "Paused", "Resumed", "Restarted", "ForwardedTo", "JumpedTo",
    "ChangedResolution", "ChangedSize", "ChangedSpeed", "ChangedVolume",
    "EnabledClosedCaptioning", "DisabledClosedCaptioning", "EnteredFullScreen",
    "ExitedFullScreen", "Muted", "Unmuted", "OpenedPopout", "ClosedPopout",
)

RESOURCE_MANAGEMENT_ACTIONS = (
    "Archived", "Copied", "Created", "Deleted", "Described", "Downloaded", "Modified",
    "Printed", "Published", "Restored", "Retrieved", "Saved", "Unpublished", "Uploaded",
)

# --- other term vocabularies -------------------------------------------------

ROLES = frozenset(
    """
    Administrator ContentDeveloper Instructor Learner Manager Member Mentor Officer
    Administrator#Administrator Administrator#Developer Administrator#ExternalDeveloper
    Administrator#ExternalSupport Administrator#ExternalSystemAdministrator
    Administrator#Support Administrator#SystemAdministrator
    ContentDeveloper#ContentDeveloper ContentDeveloper#ContentExpert
    ContentDeveloper#ExternalContentExpert ContentDeveloper#Librarian
    Instructor#ExternalInstructor Instructor#Grader Instructor#GuestInstructor
    Instructor#Instructor Instructor#Lecturer Instructor#PrimaryInstructor
    Instructor#SecondaryInstructor Instructor#TeachingAssistant
    Instructor#TeachingAssistantGroup Instructor#TeachingAssistantOffering
    Instructor#TeachingAssistantSection Instructor#TeachingAssistantTemplate
    Learner#ExternalLearner Learner#GuestLearner Learner#Learner Learner#NonCreditLearner
    Manager#AreaManager Manager#CourseCoordinator Manager#ExternalObserver
    Manager#Manager Manager#Observer Member#Member
    Mentor#Advisor Mentor#Auditor Mentor#ExternalAdvisor Mentor#ExternalAuditor
    Mentor#ExternalLearningFacilitator Mentor#ExternalMentor Mentor#ExternalReviewer
    Mentor#ExternalTutor Mentor#LearningFacilitator Mentor#Mentor Mentor#Reviewer
    Mentor#Tutor Officer#Chair Officer#Secretary Officer#Treasurer Officer#Vice-Chair
    """.split()
)

STATUSES = frozenset({"Active", "Inactive"})

METRICS = frozenset(
    """
    AssessmentsPassed AssessmentsSubmitted MinutesOnTask SkillsMastered
    StandardsMastered UnitsCompleted UnitsPassed WordsRead
    """.split()
)

LTI_MESSAGE_TYPES = frozenset({"LtiResourceLinkRequest", "LtiDeepLinkingRequest"})

SYSTEM_IDENTIFIER_TYPES = frozenset(
    """
    AccountUserName CaseItemUri EmailAddress LisSourcedId LtiContextId
    LtiDeploymentId LtiPlatformId LtiToolId LtiUserId OneRosterSourcedId Other
    SisSourcedId SystemId
    """.split()
)

# Caliper 1.2 profile terms and the event types each profile governs.
PROFILE_EVENTS = {
    "AnnotationProfile": ("AnnotationEvent",),
    "AssessmentProfile": ("AssessmentEvent", "AssessmentItemEvent", "NavigationEvent", "ViewEvent"),
    "AssignableProfile": ("AssignableEvent", "NavigationEvent", "ViewEvent"),
    "FeedbackProfile": ("FeedbackEvent",),
    "ForumProfile": ("ForumEvent", "MessageEvent", "NavigationEvent", "ThreadEvent", "ViewEvent"),
    "GeneralProfile": ("Event",),
    "GradingProfile": ("GradeEvent", "ViewEvent"),
    "MediaProfile": ("MediaEvent", "NavigationEvent", "ViewEvent"),
    "ReadingProfile": ("NavigationEvent", "ViewEvent"),
    "ResourceManagementProfile": ("ResourceManagementEvent",),
    "SearchProfile": ("SearchEvent",),
    "SessionProfile": ("SessionEvent",),
    "SurveyProfile": (
        "NavigationEvent", "QuestionnaireEvent", "QuestionnaireItemEvent",
        "SurveyEvent", "SurveyInvitationEvent", "ViewEvent",
    ),
    "ToolLaunchProfile": ("ToolLaunchEvent",),
    "ToolUseProfile": ("ToolUseEvent",),
}
