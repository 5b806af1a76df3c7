from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from . import views
from .api.errors import api_not_found

# Errors Django answers itself (a request it refuses to read, an uncaught exception): JSON
# under /api/ like every other API error, the normal pages elsewhere.
handler400 = "crm.api.errors.bad_request"
handler500 = "crm.api.errors.server_error"

urlpatterns = [
    path("", views.home, name="home"),
    path("login/", auth_views.LoginView.as_view(redirect_authenticated_user=True), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("reports/", views.reports_view, name="reports"),
    path("setup/", views.setup_view, name="setup"),
    path("admin/", admin.site.urls),
    path("api/v1/", include("crm.api.urls")),
    path("api/", api_not_found),
    path("api/<path:rest>", api_not_found),
    path("", include("mailsync.urls")),
    *views.record_urlpatterns(),
]
