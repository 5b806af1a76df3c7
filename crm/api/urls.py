from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.routers import DefaultRouter

from mailsync.api.views import ROUTES as mail_routes

from . import views
from .parsers import PARSER_CLASSES

router = DefaultRouter()
router.register("users", views.UserViewSet, basename="user")
router.register("stages", views.DealStageViewSet, basename="stage")
router.register("leads", views.LeadViewSet, basename="lead")
router.register("contacts", views.ContactViewSet, basename="contact")
router.register("accounts", views.AccountViewSet, basename="account")
router.register("deals", views.DealViewSet, basename="deal")
for prefix, viewset, basename in mail_routes:
    router.register(prefix, viewset, basename=basename)

urlpatterns = [
    path("auth/token/", ObtainAuthToken.as_view(parser_classes=PARSER_CLASSES), name="api-token"),
    path("schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    path("", include(router.urls)),
]
